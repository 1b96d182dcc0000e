//! Micro-benchmarks of the pure pieces every pull goes through: routing a path, parsing a digest
//! and a `Range` header, and mapping a digest to its storage path.
//!
//! `cargo bench -p lighter-benches`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use lighter_layout::{range, route, Digest, Layout};

const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn parsing(c: &mut Criterion) {
    let blob_path = format!("/v2/library/nginx/blobs/{DIGEST}");
    c.bench_function("route/blob", |b| {
        b.iter(|| route::parse(black_box(&blob_path)))
    });
    c.bench_function("route/manifest_by_tag", |b| {
        b.iter(|| route::parse(black_box("/v2/library/nginx/manifests/1.27-alpine")))
    });
    c.bench_function("digest/parse_sha256", |b| {
        b.iter(|| Digest::parse(black_box(DIGEST)))
    });
    c.bench_function("range/suffix", |b| {
        b.iter(|| range::answer(black_box(Some(b"bytes=65536-131071".as_slice())), 1 << 26))
    });
    let layout = Layout::open("/var/lib/lighter");
    let digest = Digest::parse(DIGEST).unwrap();
    c.bench_function("layout/blob_path", |b| {
        b.iter(|| layout.blob_path(black_box(&digest)))
    });
}

criterion_group!(benches, parsing);
criterion_main!(benches);
