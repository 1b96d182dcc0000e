//! The object store's own speed, for `benches/s3bench.py`: PUTs or GETs of whole objects straight
//! to an S3-compatible bucket, all at once, with the client and the request shape Lighter's
//! replicated mode uses (`object_store`'s S3 client; one PUT up to `--part-size-bytes`, above it
//! a multipart upload of parts of that size, 2 in flight, read from the file 1 MiB at a time:
//! `controlplane/src/bucket.rs`), so a ratio against it is Lighter's own work and not another
//! client's. Credentials from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
//!
//! ```text
//! s3raw put --endpoint URL --bucket B --region R [--part-size-bytes N] KEY=FILE...
//! s3raw get --endpoint URL --bucket B --region R KEY...
//! ```
//!
//! Prints one JSON line: `{"op":"put","objects":N,"bytes":N,"seconds":S}` (the time from the
//! first request to the last answer; GET bodies are read to their end and dropped).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

/// As `bucket::S3_PARTS_IN_FLIGHT`.
const PARTS_IN_FLIGHT: usize = 2;
/// As `bucket.rs`'s reads of an ingest file.
const READ_BYTES: usize = 1 << 20;

struct Args {
    op: String,
    endpoint: String,
    bucket: String,
    region: String,
    part_size: u64,
    objects: Vec<String>,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "s3raw: {why}\nusage: s3raw put|get --endpoint URL --bucket B --region R \
         [--part-size-bytes N] (KEY=FILE... | KEY...)"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let op = it.next().unwrap_or_else(|| usage("no operation"));
    if op != "put" && op != "get" {
        usage(&format!("unknown operation {op:?}"));
    }
    let mut a = Args {
        op,
        endpoint: String::new(),
        bucket: String::new(),
        region: "us-east-1".into(),
        part_size: 16 << 20,
        objects: Vec::new(),
    };
    while let Some(x) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| usage(&format!("{name}: no value")))
        };
        match x.as_str() {
            "--endpoint" => a.endpoint = value("--endpoint"),
            "--bucket" => a.bucket = value("--bucket"),
            "--region" => a.region = value("--region"),
            "--part-size-bytes" => {
                a.part_size = value("--part-size-bytes")
                    .parse()
                    .unwrap_or_else(|_| usage("--part-size-bytes: not a number"))
            }
            _ if x.starts_with("--") => usage(&format!("unknown option {x}")),
            _ => a.objects.push(x),
        }
    }
    if a.endpoint.is_empty() || a.bucket.is_empty() || a.objects.is_empty() {
        usage("--endpoint, --bucket and at least one object are needed");
    }
    a
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| usage(&format!("{name} is not set")))
}

/// One object up, as `Bucket::put_blob` sends a blob.
async fn put(store: &dyn ObjectStore, key: &str, file: &str, part: u64) -> u64 {
    let f = std::fs::File::open(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let len = f.metadata().expect("metadata").len();
    let path = Path::from(key);
    if len <= part {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0).expect("read");
        store
            .put(&path, PutPayload::from(buf))
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        return len;
    }
    let upload = store
        .put_multipart(&path)
        .await
        .unwrap_or_else(|e| panic!("starting the upload of {key}: {e}"));
    let mut w = WriteMultipart::new_with_chunk_size(upload, part as usize);
    let f = Arc::new(f);
    let mut offset = 0u64;
    while offset < len {
        w.wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        let n = (len - offset).min(READ_BYTES as u64) as usize;
        let f = f.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .expect("reader")
        .expect("read");
        w.write(&buf);
        offset += n as u64;
    }
    w.finish()
        .await
        .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    len
}

/// One object down, its body read to the end.
async fn get(store: &dyn ObjectStore, key: &str) -> u64 {
    let got = store
        .get(&Path::from(key))
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"));
    let mut body = got.into_stream();
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        n += chunk.unwrap_or_else(|e| panic!("GET {key}: {e}")).len() as u64;
    }
    n
}

#[tokio::main]
async fn main() {
    let a = parse();
    let options = ClientOptions::new()
        .with_allow_http(a.endpoint.starts_with("http://"))
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout_disabled();
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&a.endpoint)
            .with_bucket_name(&a.bucket)
            .with_region(&a.region)
            .with_access_key_id(env("AWS_ACCESS_KEY_ID"))
            .with_secret_access_key(env("AWS_SECRET_ACCESS_KEY"))
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .build()
            .unwrap_or_else(|e| usage(&format!("{e}"))),
    );
    let started = Instant::now();
    let tasks: Vec<_> = a
        .objects
        .iter()
        .map(|o| {
            let (store, o, op, part) = (store.clone(), o.clone(), a.op.clone(), a.part_size);
            tokio::spawn(async move {
                match op.as_str() {
                    "put" => {
                        let (key, file) = o
                            .split_once('=')
                            .unwrap_or_else(|| usage(&format!("{o}: expected KEY=FILE")));
                        put(store.as_ref(), key, file, part).await
                    }
                    _ => get(store.as_ref(), &o).await,
                }
            })
        })
        .collect();
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await.expect("a transfer failed");
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"op\":\"{}\",\"objects\":{},\"bytes\":{bytes},\"seconds\":{seconds:.6}}}",
        a.op,
        a.objects.len()
    );
}
