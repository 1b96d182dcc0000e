//! The object keys of the replicated mode's bucket (`[storage.s3]`): the data directory's tree
//! again, content addressed the same way, so a replica's cache and the bucket say the same
//! things in the same words. Pure: the control plane's S3 client reads and writes these keys.
//!
//! ```text
//! <bucket>/
//! ├── blobs/<alg>/<hex>                  content (layers, configs, manifests), immutable
//! └── repos/<name>/
//!     ├── _blobs/<alg>/<hex>             empty: the blob is in this repository
//!     ├── _manifests/<alg>/<hex>         "<media type>\n": the manifest is in this repository
//!     └── _tags/<tag>                    "<digest> <media type>\n", as the tag file
//! ```
//!
//! Content is written before any key that names it (a blob before its link, a manifest's
//! content and link before a tag), each key by one PUT that replaces the object whole, so a
//! reader of the bucket never finds a link to missing content or a tag to a missing manifest.

use crate::inline::InlineStr;
use crate::store::MEDIA_TYPE_LENGTH_MAX;
use crate::{Digest, ManifestEntry, RepoName, Tag};

/// `blobs/<alg>/<hex>`
pub fn content_key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().name(), digest.hex())
}

/// `repos/<name>/_blobs/<alg>/<hex>`
pub fn blob_link_key(name: &RepoName, digest: &Digest) -> String {
    format!(
        "repos/{name}/_blobs/{}/{}",
        digest.algorithm().name(),
        digest.hex()
    )
}

/// `repos/<name>/_manifests/<alg>/<hex>`
pub fn manifest_link_key(name: &RepoName, digest: &Digest) -> String {
    format!(
        "repos/{name}/_manifests/{}/{}",
        digest.algorithm().name(),
        digest.hex()
    )
}

/// `repos/<name>/_tags/<tag>`
pub fn tag_key(name: &RepoName, tag: &Tag) -> String {
    format!("repos/{name}/_tags/{tag}")
}

/// `repos/<name>/_tags/`: the prefix under which a repository's tags are listed.
pub fn tags_prefix(name: &RepoName) -> String {
    format!("repos/{name}/_tags/")
}

/// The body of a tag object: `<digest> <media type>\n`.
pub fn tag_record(entry: &ManifestEntry) -> String {
    format!("{} {}\n", entry.digest, entry.media_type)
}

/// A tag object's body read back; None if it is not one.
pub fn parse_tag_record(bytes: &[u8]) -> Option<ManifestEntry> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (digest, media_type) = text.trim_end().split_once(' ')?;
    Some(ManifestEntry {
        digest: Digest::parse(digest).ok()?,
        media_type: InlineStr::new(media_type)?,
    })
}

/// A manifest link object's body read back (its media type); None if it is not one.
pub fn parse_manifest_link(bytes: &[u8]) -> Option<InlineStr<MEDIA_TYPE_LENGTH_MAX>> {
    let text = std::str::from_utf8(bytes).ok()?.trim_end();
    crate::media::manifest_kind(text)?;
    InlineStr::new(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_data_directory_tree() {
        let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let name = RepoName::parse("team/app").unwrap();
        let tag = Tag::parse("v1.0").unwrap();
        let hex = "ab".repeat(32);
        assert_eq!(content_key(&d), format!("blobs/sha256/{hex}"));
        assert_eq!(
            blob_link_key(&name, &d),
            format!("repos/team/app/_blobs/sha256/{hex}")
        );
        assert_eq!(
            manifest_link_key(&name, &d),
            format!("repos/team/app/_manifests/sha256/{hex}")
        );
        assert_eq!(tag_key(&name, &tag), "repos/team/app/_tags/v1.0");
        assert!(tag_key(&name, &tag).starts_with(&tags_prefix(&name)));
    }

    #[test]
    fn tag_records_round_trip_and_junk_is_refused() {
        let entry = ManifestEntry {
            digest: Digest::parse(&format!("sha256:{}", "0f".repeat(32))).unwrap(),
            media_type: InlineStr::new("application/vnd.oci.image.manifest.v1+json").unwrap(),
        };
        let text = tag_record(&entry);
        assert_eq!(parse_tag_record(text.as_bytes()), Some(entry));
        assert_eq!(parse_tag_record(b"sha256:zz application/json\n"), None);
        assert_eq!(parse_tag_record(b""), None);
        assert_eq!(parse_tag_record(&[0xff, 0xfe]), None);
    }

    #[test]
    fn manifest_links_hold_a_manifest_media_type() {
        let t = "application/vnd.oci.image.index.v1+json";
        assert_eq!(
            parse_manifest_link(format!("{t}\n").as_bytes()).map(|m| m.as_str().to_owned()),
            Some(t.to_owned())
        );
        assert!(parse_manifest_link(b"text/plain\n").is_none());
    }
}
