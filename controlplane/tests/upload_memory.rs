//! Uploads stream to disk: a 1 GiB monolithic PUT must not make the server hold the blob in memory.
//! The blob is generated on the fly (never held by the test either), hashed as it is sent, and
//! read back and hashed as it is received.

mod common;
mod oci;

use std::io::Read;
use std::sync::{Arc, Mutex};

use common::{process_tree, Server};
use oci::*;
use sha2::Digest as _;

const MIB: u64 = 1024 * 1024;
const BLOB_SIZE_BYTES: u64 = 1024 * MIB;
const SERVER_PEAK_RSS_MAX_BYTES: u64 = 128 * MIB;

/// A deterministic stream of `len` bytes: a 1 MiB random block repeated, with the index of each
/// MiB written over its first 8 bytes so no two MiB are alike. Hashes what it yields.
struct Generated {
    block: Arc<Vec<u8>>,
    pos: u64,
    len: u64,
    hasher: Arc<Mutex<sha2::Sha256>>,
}

impl Generated {
    fn new(block: Arc<Vec<u8>>, len: u64) -> Generated {
        Generated {
            block,
            pos: 0,
            len,
            hasher: Arc::new(Mutex::new(sha2::Sha256::new())),
        }
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let off = (self.pos % MIB) as usize;
        let n = buf
            .len()
            .min(MIB as usize - off)
            .min((self.len - self.pos) as usize);
        buf[..n].copy_from_slice(&self.block[off..off + n]);
        if off < 8 {
            let header = (self.pos / MIB).to_le_bytes();
            let k = (8 - off).min(n);
            buf[..k].copy_from_slice(&header[off..off + k]);
        }
        self.hasher.lock().unwrap().update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

fn hex_digest(hasher: sha2::Sha256) -> String {
    let mut s = String::from("sha256:");
    for b in hasher.finalize() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The digest of the generated stream, computed by generating it once.
fn digest_of(block: &Arc<Vec<u8>>, len: u64) -> String {
    let mut g = Generated::new(block.clone(), len);
    let mut buf = vec![0u8; MIB as usize];
    while g.read(&mut buf).unwrap() > 0 {}
    let hasher = g.hasher.lock().unwrap().clone();
    hex_digest(hasher)
}

/// The peak RSS of every process of the server (supervisor, control plane, data plane), summed.
fn server_peak_rss_bytes(server: &Server) -> u64 {
    let tree = process_tree(server.pid());
    let mut total = 0;
    for pid in tree {
        let peak = peak_rss_bytes(pid);
        eprintln!("pid {pid}: peak RSS {} MiB", peak / MIB);
        total += peak;
    }
    total
}

// spec: Push / Pushing a blob monolithically / POST then PUT, at 1 GiB: streamed, bounded memory
#[test]
fn monolithic_put_of_1_gib_streams_with_bounded_server_memory() {
    let server = Server::start();
    let block = Arc::new(common::random_bytes(MIB as usize, 0x1_0000));
    let digest = digest_of(&block, BLOB_SIZE_BYTES);

    let location = start_upload(&server, "huge");
    let body = Generated::new(block.clone(), BLOB_SIZE_BYTES);
    let sent_hasher = body.hasher.clone();
    let r = send(req::put_upload(
        &server,
        &location,
        &digest,
        reqwest::blocking::Body::sized(body, BLOB_SIZE_BYTES),
    ));
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    let sent = hex_digest(sent_hasher.lock().unwrap().clone());
    assert_eq!(sent, digest, "the test sent other bytes than it hashed");

    let peak = server_peak_rss_bytes(&server);
    eprintln!("server peak RSS after a 1 GiB upload: {} MiB", peak / MIB);
    assert!(
        peak < SERVER_PEAK_RSS_MAX_BYTES,
        "server peak RSS {} MiB >= {} MiB: the upload was buffered in memory",
        peak / MIB,
        SERVER_PEAK_RSS_MAX_BYTES / MIB
    );

    // Read it back, streaming and hashing.
    let mut resp = client()
        .get(server.url(&format!("/v2/huge/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["Content-Length"].to_str().unwrap(),
        BLOB_SIZE_BYTES.to_string()
    );
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut received = 0u64;
    loop {
        let n = resp.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        received += n as u64;
    }
    assert_eq!(received, BLOB_SIZE_BYTES);
    assert_eq!(hex_digest(hasher), digest);
    let peak = server_peak_rss_bytes(&server);
    assert!(
        peak < SERVER_PEAK_RSS_MAX_BYTES,
        "server peak RSS {} MiB after serving 1 GiB",
        peak / MIB
    );
}

// spec: Push / Pushing a blob in chunks, streamed: PATCHes without Content-Range (chunked transfer
// encoding, no length known up front) of 256 MiB each must not be buffered either
#[test]
fn streamed_patches_of_512_mib_keep_server_memory_bounded() {
    let server = Server::start();
    let block = Arc::new(common::random_bytes(MIB as usize, 0x2_0000));
    let total = 512 * MIB;
    let digest = digest_of(&block, total);
    // The two halves of one generated stream: the second starts where the first ended.
    let mut first = Generated::new(block.clone(), total);
    first.len = total / 2;
    let hasher = first.hasher.clone();
    let mut second = Generated::new(block, total);
    second.pos = total / 2;
    second.hasher = hasher.clone();

    let mut location = start_upload(&server, "streamed");
    for (part, end) in [(first, total / 2), (second, total)] {
        let r = send(req::patch_upload(
            &server,
            &location,
            reqwest::blocking::Body::new(part),
        ));
        r.assert_status(202);
        assert_eq!(r.header("Range"), format!("0-{}", end - 1));
        location = r.header("Location").to_string();
    }
    assert_eq!(hex_digest(hasher.lock().unwrap().clone()), digest);
    let r = put_upload(&server, &location, &digest, b"");
    r.assert_status(201);
    let h = head(&server, &format!("/v2/streamed/blobs/{digest}"));
    h.assert_status(200);
    assert_eq!(h.header("Content-Length"), total.to_string());

    let peak = server_peak_rss_bytes(&server);
    assert!(
        peak < SERVER_PEAK_RSS_MAX_BYTES,
        "server peak RSS {} MiB >= {} MiB after 512 MiB of streamed PATCHes",
        peak / MIB,
        SERVER_PEAK_RSS_MAX_BYTES / MIB
    );
}
