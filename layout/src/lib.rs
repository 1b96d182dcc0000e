//! Lighter's on-disk layout and OCI vocabulary.
//!
//! This crate (with `lighter-access`, for access control) is what the control plane and the data
//! plane share, and the only code that builds storage paths or writes under the data directory.
//! It also owns the vocabulary both speak: repository names, tags and references ([`name`]),
//! image references as users write them ([`image`]), digests ([`digest`]), media types
//! ([`media`]), what a manifest must be to be stored ([`manifest`]), `/v2/` routes ([`route`])
//! and `Range` headers ([`range`]). Those are pure functions over bytes, table-tested here and
//! fuzzed in `fuzz/`.
//!
//! # The data directory
//!
//! ```text
//! <data-dir>/
//! ├── blobs/<alg>/<hex[0..2]>/<hex>      content (layers, configs, manifests), immutable once there
//! ├── repos/<name>/                      <name> may have several components: repos/library/nginx/
//! │   ├── _blobs/<alg>/<hex>             empty file: the blob is in this repository
//! │   ├── _manifests/<alg>/<hex>         "<media type>\n": the manifest is in this repository
//! │   ├── _tags/<tag>                    "<digest> <media type>\n"
//! │   └── _referrers/<alg>/<subject hex>/<alg>-<hex>
//! │                                      descriptor (JSON) of a manifest whose subject is that digest
//! ├── uploads/<id>/data                  bytes of an upload session received so far (an ingest)
//! │               /repo                  "<name>\n<alg>\n": whose session it is, how it is hashed
//! ├── auth/token-key.pem                 the key signing access tokens, when none is configured
//! ├── run/events/core-<n>.ring           each data plane core's event ring (see [`events`]): the
//! │                                      data plane's one file of its own, runtime state only
//! ├── events/<unix ms>.jsonl             the event log: one JSON object per line, appended by
//! │                                      the control plane, rotated and expired by size and age
//! ├── inventory.json                     the workload inventory (which pods run which images), a
//! │                                      JSON document rewritten whole by the control plane
//! ├── events/usage.json                  pulls summed per repository, tag and digest from the log,
//! │                                      and the log position it covers (published whole)
//! ├── notifications/<seq>.jsonl         the notification queue: CloudEvents, one per line,
//! │                                      appended by the control plane, dropped once delivered
//! ├── notifications/cursors/<endpoint>   "<seq> <offset>\n": how far an endpoint has received
//! └── tmp/                               temp files of the publish protocol
//! ```
//!
//! Names of repository components cannot start with `_` (see [`name::RepoName`]), so the
//! `_`-directories never collide with a nested repository. Every path in the tree is built in
//! `store/paths.rs`, and only there.
//!
//! # Reading
//!
//! A reader (`store/read.rs`) serves a request with one or two `openat`/`statx` calls and no JSON:
//! a blob is `stat(repos/<name>/_blobs/..)` then `open(blobs/..)`; a manifest by tag is
//! `read(_tags/<tag>)` (digest and media type) then `open(blobs/..)`; by digest,
//! `read(_manifests/..)` (media type) then `open(blobs/..)`. Bodies can go to the socket with
//! sendfile straight from the opened file.
//!
//! # Writing: the publish protocol
//!
//! One writer process (the control plane). Every file appears by: write a temp file in `tmp/`,
//! fsync it, rename it into place, fsync the directory (new directories are fsynced into their
//! parents too). Readers therefore see the old file or the whole new one, never part of one, and a
//! push acknowledged after the call returns survives a crash (`store/publish.rs`). Uploads are
//! written to an [`store::Ingest`] (`store/ingest.rs`); only [`store::Layout::commit`], which
//! verifies the digest, moves bytes into `blobs/`. Deleting a manifest removes the tags pointing
//! at it first, so a tag never names a manifest that is gone.

pub mod bucket;
pub mod containerd;
pub mod digest;
pub mod events;
pub mod image;
pub mod inline;
pub mod manifest;
pub mod media;
pub mod name;
pub mod range;
pub mod route;
pub mod store;

pub use containerd::ContainerdContent;
pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use image::ImageRef;
pub use name::{mirror_prefix, Reference, RepoName, Tag};
pub use route::{Route, RouteError, UploadId};
pub use store::{CommitError, FileId, Ingest, Layout, ManifestEntry, PartWriter};
