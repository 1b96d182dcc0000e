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
//!     ├── _referrers/<alg>/<subject hex>/<alg>-<hex>
//!     │                                  the referrer's descriptor (JSON), as in the data directory
//!     └── _tags/<tag>                    "<digest> <media type>\n", as the tag file
//! ```
//!
//! Content is written before any key that names it (a blob before its link, a manifest's
//! content and link before its referrer record and its tags), each key by one PUT that replaces
//! the object whole, so a reader of the bucket never finds a link to missing content or a tag
//! (or referrer record) naming a missing manifest. A repository is a prefix under `repos/` with
//! one of the link folders ([`LINK_FOLDERS`]) below it: names never have a component starting
//! with `_`, so the catalog is found by listing the tree level by level.

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

/// `repos/`: under it, one prefix per repository name.
pub const REPOS_PREFIX: &str = "repos/";

/// The folders a repository's prefix holds; one of them below a prefix makes it a repository.
pub const LINK_FOLDERS: [&str; 4] = ["_blobs", "_manifests", "_tags", "_referrers"];

/// `repos/<name>/_referrers/<alg>/<subject hex>/`: the prefix under which the records of a
/// subject's referrers are listed, in referrer digest order.
pub fn referrers_prefix(name: &RepoName, subject: &Digest) -> String {
    format!(
        "repos/{name}/_referrers/{}/{}/",
        subject.algorithm().name(),
        subject.hex()
    )
}

/// `repos/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>`: a referrer's descriptor.
pub fn referrer_key(name: &RepoName, subject: &Digest, referrer: &Digest) -> String {
    format!(
        "{}{}-{}",
        referrers_prefix(name, subject),
        referrer.algorithm().name(),
        referrer.hex()
    )
}

/// The referrer digest a record's key (its last component, `<alg>-<hex>`) names.
pub fn referrer_of_key(file_name: &str) -> Option<Digest> {
    let (alg, hex) = file_name.split_once('-')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
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
        let r = Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        let key = referrer_key(&name, &d, &r);
        assert_eq!(
            key,
            format!(
                "repos/team/app/_referrers/sha256/{hex}/sha256-{}",
                "cd".repeat(32)
            )
        );
        assert!(key.starts_with(&referrers_prefix(&name, &d)));
        assert!(key.starts_with(REPOS_PREFIX));
        assert_eq!(referrer_of_key(key.rsplit('/').next().unwrap()), Some(r));
        assert_eq!(referrer_of_key("sha256-zz"), None);
        assert_eq!(referrer_of_key("nodash"), None);
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
