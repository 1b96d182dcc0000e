//! The object keys of the replicated mode's bucket (`[storage.s3]`): the data directory's tree
//! again, content addressed the same way, so a replica's cache and the bucket say the same
//! things in the same words. Pure: the control plane's S3 client reads and writes these keys.
//!
//! ```text
//! <bucket>/
//! ├── blobs/<alg>/<hex>                  content (layers, configs, manifests), immutable
//! ├── repos/<name>/
//! │   ├── _blobs/<alg>/<hex>             empty: the blob is in this repository
//! │   ├── _manifests/<alg>/<hex>         "<media type>\n": the manifest is in this repository
//! │   ├── _referrers/<alg>/<subject hex>/<alg>-<hex>
//! │   │                                  the referrer's descriptor (JSON), as in the data directory
//! │   └── _tags/<tag>                    "<digest> <media type>\n", as the tag file
//! ├── deleted/<stamp>/<what>/<name>      empty: the journal of deletes, read by every replica
//! └── gc/clock                           empty: written by a collector to read the store's clock
//! ```
//!
//! A journal key says everything in its name (so a replica reads the journal with listings
//! alone): `<stamp>` is `<ms since the epoch, 16 digits>-<16 hex digits of nonce>`, so keys
//! sort by time; `<what>` is `blob/<alg>/<hex>`, `manifest/<alg>/<hex>` or `tag/<tag>`; the
//! repository's name comes last because it may contain `/`.
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

/// `gc/clock`: a collector PUTs it and reads its last-modified back: the store's time now.
pub const CLOCK_KEY: &str = "gc/clock";

/// `blobs/`: where content is listed from.
pub const CONTENT_PREFIX: &str = "blobs/";
/// `repos/`: where every link and tag is listed from.
pub const REPOS_PREFIX: &str = "repos/";
/// `deleted/`: the journal of deletes.
pub const JOURNAL_PREFIX: &str = "deleted/";

/// The digest of a content key (`blobs/<alg>/<hex>`); None if it is not one.
pub fn parse_content_key(key: &str) -> Option<Digest> {
    let (alg, hex) = key.strip_prefix(CONTENT_PREFIX)?.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// What a key under `repos/` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoKey {
    /// `repos/<name>/_blobs/<alg>/<hex>`
    Blob(RepoName, Digest),
    /// `repos/<name>/_manifests/<alg>/<hex>`
    Manifest(RepoName, Digest),
    /// `repos/<name>/_tags/<tag>` (the digest is in the object's body)
    Tag(RepoName, Tag),
}

/// A key under `repos/` read back; None if it is none of the three (a name component never
/// starts with `_`, so the first `/_blobs/`, `/_manifests/` or `/_tags/` ends the name).
pub fn parse_repo_key(key: &str) -> Option<RepoKey> {
    let rest = key.strip_prefix(REPOS_PREFIX)?;
    let digest = |s: &str| {
        let (alg, hex) = s.split_once('/')?;
        Digest::parse(&format!("{alg}:{hex}")).ok()
    };
    for (marker, kind) in [("/_blobs/", 0), ("/_manifests/", 1), ("/_tags/", 2)] {
        let Some(at) = rest.find(marker) else {
            continue;
        };
        let name = RepoName::parse(&rest[..at]).ok()?;
        let tail = &rest[at + marker.len()..];
        return match kind {
            0 => Some(RepoKey::Blob(name, digest(tail)?)),
            1 => Some(RepoKey::Manifest(name, digest(tail)?)),
            _ => Some(RepoKey::Tag(name, Tag::parse(tail).ok()?)),
        };
    }
    None
}

/// A delete, as the journal records it for the other replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletion {
    Blob(RepoName, Digest),
    Manifest(RepoName, Digest),
    Tag(RepoName, Tag),
}

impl Deletion {
    pub fn repository(&self) -> &RepoName {
        match self {
            Deletion::Blob(n, _) | Deletion::Manifest(n, _) | Deletion::Tag(n, _) => n,
        }
    }
}

/// `deleted/<stamp_ms>-<nonce>/<what>/<name>`: one entry of the journal of deletes.
pub fn journal_key(stamp_ms: u64, nonce: u64, d: &Deletion) -> String {
    let what = match d {
        Deletion::Blob(_, g) => format!("blob/{}/{}", g.algorithm().name(), g.hex()),
        Deletion::Manifest(_, g) => format!("manifest/{}/{}", g.algorithm().name(), g.hex()),
        Deletion::Tag(_, t) => format!("tag/{t}"),
    };
    format!(
        "{JOURNAL_PREFIX}{stamp_ms:016}-{nonce:016x}/{what}/{}",
        d.repository()
    )
}

/// `deleted/<stamp_ms>`: listing after this key gives the entries stamped `stamp_ms` or later.
pub fn journal_cursor(stamp_ms: u64) -> String {
    format!("{JOURNAL_PREFIX}{stamp_ms:016}")
}

/// A journal key read back: its stamp (ms since the epoch) and the delete; None if it is not
/// one.
pub fn parse_journal_key(key: &str) -> Option<(u64, Deletion)> {
    let rest = key.strip_prefix(JOURNAL_PREFIX)?;
    let (stamp, rest) = rest.split_once('/')?;
    let (ms, nonce) = stamp.split_once('-')?;
    if ms.len() != 16 || nonce.len() != 16 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    let (kind, rest) = rest.split_once('/')?;
    let digest_and_name = |s: &str| {
        let (alg, s) = s.split_once('/')?;
        let (hex, name) = s.split_once('/')?;
        let d = Digest::parse(&format!("{alg}:{hex}")).ok()?;
        Some((RepoName::parse(name).ok()?, d))
    };
    let d = match kind {
        "blob" => digest_and_name(rest).map(|(n, d)| Deletion::Blob(n, d))?,
        "manifest" => digest_and_name(rest).map(|(n, d)| Deletion::Manifest(n, d))?,
        "tag" => {
            let (tag, name) = rest.split_once('/')?;
            Deletion::Tag(RepoName::parse(name).ok()?, Tag::parse(tag).ok()?)
        }
        _ => return None,
    };
    Some((ms, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_keys_round_trip_sort_by_time_and_junk_is_refused() {
        let d = Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        let name = RepoName::parse("team/app").unwrap();
        let all = [
            Deletion::Blob(name.clone(), d.clone()),
            Deletion::Manifest(name.clone(), d.clone()),
            Deletion::Tag(name.clone(), Tag::parse("v1.0").unwrap()),
        ];
        for del in &all {
            let key = journal_key(1_700_000_000_123, 0xfeed, del);
            assert_eq!(
                parse_journal_key(&key),
                Some((1_700_000_000_123, del.clone()))
            );
            assert!(key > journal_cursor(1_700_000_000_123), "{key}");
            assert!(key < journal_cursor(1_700_000_000_124), "{key}");
        }
        assert_eq!(
            journal_key(5, 1, &all[2]),
            "deleted/0000000000000005-0000000000000001/tag/v1.0/team/app"
        );
        assert!(journal_key(999, 0, &all[0]) < journal_key(1000, 0, &all[0]));
        for junk in [
            "deleted/x",
            "deleted/0000000000000005-0000000000000001/tag/v1.0/",
            "deleted/0000000000000005-0000000000000001/what/v1.0/team/app",
            "deleted/0000000000000005-zz00000000000001/tag/v1.0/team/app",
            "deleted/0000000000000005-0000000000000001/blob/sha256/ab/team/app",
            "repos/team/app/_tags/v1",
        ] {
            assert_eq!(parse_journal_key(junk), None, "{junk}");
        }
    }

    #[test]
    fn repository_and_content_keys_parse_back() {
        let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let name = RepoName::parse("team/blobs/app").unwrap();
        let tag = Tag::parse("latest").unwrap();
        assert_eq!(parse_content_key(&content_key(&d)), Some(d.clone()));
        assert_eq!(
            parse_repo_key(&blob_link_key(&name, &d)),
            Some(RepoKey::Blob(name.clone(), d.clone()))
        );
        assert_eq!(
            parse_repo_key(&manifest_link_key(&name, &d)),
            Some(RepoKey::Manifest(name.clone(), d.clone()))
        );
        assert_eq!(
            parse_repo_key(&tag_key(&name, &tag)),
            Some(RepoKey::Tag(name, tag))
        );
        assert_eq!(parse_repo_key("repos/team/app/_uploads/x"), None);
        assert_eq!(parse_content_key("blobs/sha256/short"), None);
        assert_eq!(parse_content_key(CLOCK_KEY), None);
    }

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
