//! The event log's cost on the pull path, piece by piece: filling a pull's record (what a core
//! does as it serves), counting the request (route, status, bytes, latency histogram), and
//! pushing the record into the core's ring while the control plane's drain reads the ring on
//! another thread, as it does under load (the cache lines a push writes are the ones the
//! drain read last). Their sum is what a pull pays for the log, apart from the drain's CPU.
//! And what it pays when the drain has fallen behind: the check that finds the ring full, and
//! the drop counted, as the record is then never filled in.
//!
//! `cargo bench -p lighter-benches --bench ring`

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use lighter_layout::events::{Action, Record, RingReader, RingWriter};

const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A blob pull's record, filled as the data plane fills it (the client's address comes parsed).
fn fill(r: &mut Record, client: IpAddr) {
    r.set_identity(b"");
    r.start(Action::BlobGet, "library/nginx", &["sha256", ":", HEX]);
    r.set_agent(b"containerd/2.0.2");
    r.set_client(Some(client));
    r.set_digest(&["sha256", ":", HEX]);
    r.status = 200;
    r.bytes_sent = 4423;
    r.duration_us = 40;
    r.time_unix_us = 1_796_050_939_318_847;
}

fn ring(c: &mut Criterion) {
    let mut r = Record::empty();
    let client: IpAddr = "198.18.0.7".parse().expect("an address");
    c.bench_function("ring/fill_record", |b| {
        b.iter(|| fill(black_box(&mut r), black_box(client)))
    });

    let dir = std::env::temp_dir().join(format!("lighter-bench-ring-{}", std::process::id()));
    let path = dir.join("core-0.ring");
    // The default ring: 1024 KiB.
    let writer = RingWriter::create(&path, 1024, 0).expect("ring");
    let reader = RingReader::open(&path).expect("ring");
    let counts = RingReader::open(&path).expect("ring");
    let stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            // As the control plane drains under load: everything there is, then a pause (it
            // is 10 ms there; shorter here to keep the benchmark short).
            while !stop.load(Ordering::Relaxed) {
                reader.drain_each(usize::MAX, u64::MAX, |r| n += r.bytes_sent);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            n
        })
    };
    c.bench_function("ring/count", |b| {
        b.iter(|| writer.count(black_box(2), black_box(200), black_box(4423), Some(40)))
    });
    fill(&mut r, client);
    // Pushes in bursts of BURST, each into a ring the drain has just emptied: every push
    // writes lines the drain's thread read last, and none is dropped.
    const BURST: u64 = 4000;
    c.bench_function("ring/push_while_drained", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                while !counts.is_empty() {
                    std::hint::spin_loop();
                }
                let n = left.min(BURST);
                let t0 = std::time::Instant::now();
                for _ in 0..n {
                    writer.push(black_box(&r));
                }
                spent += t0.elapsed();
                left -= n;
            }
            spent
        })
    });
    stop.store(true, Ordering::Relaxed);
    black_box(drain.join().expect("drain"));
    assert_eq!(counts.dropped(), 0, "a burst fits in the ring");

    // A ring the drain has fallen behind on: what a pull costs the log then (the check that
    // finds no room, and the drop counted), instead of filling and pushing a record.
    let full = RingWriter::create(&dir.join("core-1.ring"), 1, 0).expect("ring");
    while full.has_room() {
        full.push(&r);
    }
    c.bench_function("ring/shed_when_full", |b| {
        b.iter(|| {
            if !black_box(&full).has_room() {
                full.count_dropped();
            }
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, ring);
criterion_main!(benches);
