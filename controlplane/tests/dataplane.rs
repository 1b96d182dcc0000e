//! The data plane on the public port: the pull path served by each event loop (io_uring and the
//! epoll fallback, forced by flag and by a seccomp filter that blocks io_uring as container
//! runtimes do), keep-alive and pipelining, slow clients, many clients at once, shutdown, and a
//! dying plane taking the pair down.
//! Spec: "Pulling manifests", "Pulling blobs", "Checking if content exists in the registry".

mod common;
mod oci;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{sha256, Server};
use oci::*;

const ENGINES: [&str; 2] = ["io_uring", "epoll"];

/// Reads one HTTP/1.1 response with a Content-Length body from a keep-alive stream.
fn read_response(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 64 * 1024, "response head too long");
        stream.read_exact(&mut byte).expect("read response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let len = raw_content_length(&head);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("read response body");
    (status, head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Every pull-path answer, checked byte for byte, on one server.
fn check_pull_path(server: &Server) {
    let image = push_image(server, "dp/app", Some("v1"), 7);
    let big = common::random_bytes(3 << 20, 99);
    let big_digest = push_blob(server, "dp/app", &big);

    // Blob GET, HEAD, Range, 416, unknown.
    let r = get(server, &format!("/v2/dp/app/blobs/{big_digest}"));
    r.assert_status(200);
    assert_eq!(sha256(&r.body), big_digest);
    assert_eq!(r.header("docker-content-digest"), big_digest);
    assert_eq!(r.header("content-length"), big.len().to_string());
    assert_eq!(r.header("accept-ranges"), "bytes");
    let r = head(server, &format!("/v2/dp/app/blobs/{big_digest}"));
    r.assert_status(200);
    assert_eq!(r.header("content-length"), big.len().to_string());
    assert!(r.body.is_empty());
    let r = get_with(
        server,
        &format!("/v2/dp/app/blobs/{big_digest}"),
        &[("range", "bytes=65536-131071")],
    );
    r.assert_status(206);
    assert_eq!(r.body, &big[65536..131072]);
    assert_eq!(
        r.header("content-range"),
        format!("bytes 65536-131071/{}", big.len())
    );
    let r = get_with(
        server,
        &format!("/v2/dp/app/blobs/{big_digest}"),
        &[("range", "bytes=-10")],
    );
    r.assert_status(206);
    assert_eq!(r.body, &big[big.len() - 10..]);
    let r = get_with(
        server,
        &format!("/v2/dp/app/blobs/{big_digest}"),
        &[("range", "bytes=99999999-")],
    );
    r.assert_status(416);
    assert_eq!(r.header("content-range"), format!("bytes */{}", big.len()));
    get(server, &format!("/v2/other/blobs/{big_digest}")).assert_error(404, "BLOB_UNKNOWN");

    // Manifest by tag and by digest, GET and HEAD, with the stored media type.
    for reference in ["v1", image.digest.as_str()] {
        let r = get(server, &format!("/v2/dp/app/manifests/{reference}"));
        r.assert_status(200);
        assert_eq!(r.body, image.manifest);
        assert_eq!(
            r.header("content-type"),
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(r.header("docker-content-digest"), image.digest);
        let r = head(server, &format!("/v2/dp/app/manifests/{reference}"));
        r.assert_status(200);
        assert_eq!(r.header("content-length"), image.manifest.len().to_string());
        assert_eq!(r.header("docker-content-digest"), image.digest);
    }
    get(server, "/v2/dp/app/manifests/nope").assert_error(404, "MANIFEST_UNKNOWN");
    get(server, "/v2/").assert_status(200);

    // Keep-alive and pipelining: three requests in one write, answered in order.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /v2/dp/app/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n\
         HEAD /v2/dp/app/blobs/{big_digest} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /v2/dp/app/blobs/{big_digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let (status, _, body) = read_response(&mut s);
    assert_eq!((status, body.as_slice()), (200, image.manifest.as_slice()));
    let mut head_only = [0u8; 1];
    let (status, h, _) = {
        // A HEAD answer has a Content-Length but no body: read only the head.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut head_only).unwrap();
            head.push(head_only[0]);
        }
        let head = String::from_utf8(head).unwrap();
        (head[9..12].parse::<u16>().unwrap(), head, ())
    };
    assert_eq!(status, 200);
    assert_eq!(
        header(&h, "content-length"),
        Some(big.len().to_string().as_str())
    );
    let (status, _, body) = read_response(&mut s);
    assert_eq!((status, body.as_slice()), (206, &big[..10]));

    // A push on the same keep-alive connection after pulls is handed to the control plane.
    let small = b"pushed over a pulled connection";
    let d = sha256(small);
    let req = format!(
        "POST /v2/dp/app/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        small.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(small).unwrap();
    let (status, h, _) = read_response(&mut s);
    assert_eq!(status, 201, "{h}");
    assert_eq!(get(server, &format!("/v2/dp/app/blobs/{d}")).body, small);
}

#[test]
fn pull_path_is_served_by_each_io_engine() {
    for engine in ENGINES {
        let server = Server::start_args(&["--io-engine", engine]);
        let log = server.log_lines().join("\n");
        assert!(
            log.contains(&format!(
                "engine={}",
                if engine == "epoll" {
                    "Epoll"
                } else {
                    "IoUring"
                }
            )),
            "{log}"
        );
        check_pull_path(&server);
    }
}

#[test]
fn auto_engine_falls_back_to_epoll_when_seccomp_blocks_io_uring() {
    let server = Server::launch_temp(|l| l.block_io_uring());
    check_pull_path(&server);
    let log = server.log_lines();
    let warnings = log
        .iter()
        .filter(|l| l.contains("io_uring is unavailable"))
        .count();
    assert_eq!(warnings, 1, "the fallback is logged exactly once: {log:#?}");
    assert!(log.iter().any(|l| l.contains("engine=Epoll")), "{log:#?}");
}

#[test]
fn slow_and_idle_clients_are_cut_off_and_do_not_starve_others() {
    for engine in ENGINES {
        let server = Server::start_args(&[
            "--io-engine",
            engine,
            "--request-header-timeout-ms",
            "500",
            "--idle-timeout-ms",
            "1000",
        ]);
        let image = push_image(&server, "slow/app", Some("v1"), 3);
        // Slowloris: half a request head each, then nothing.
        let mut slow: Vec<TcpStream> = (0..64)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr).unwrap();
                s.write_all(b"GET /v2/slow/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .unwrap();
                s
            })
            .collect();
        // Idle keep-alive connections.
        let idle: Vec<TcpStream> = (0..64)
            .map(|_| TcpStream::connect(server.addr).unwrap())
            .collect();
        // Others are served meanwhile (each on a new connection: a pooled one could itself
        // pass the 1 s idle timeout on a loaded machine).
        let fresh = reqwest::blocking::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        for _ in 0..50 {
            let r = fresh
                .get(server.url("/v2/slow/app/manifests/v1"))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.bytes().unwrap().as_ref(), image.manifest.as_slice());
        }
        // And the slow ones are closed by the server within a bounded time.
        let started = Instant::now();
        for s in slow
            .iter_mut()
            .chain(idle.into_iter().collect::<Vec<_>>().iter_mut())
        {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap_or(0);
            // Closed (0) or, at most, an error answer before closing.
            if n > 0 {
                assert!(
                    buf.starts_with(b"HTTP/1.1 4"),
                    "{:?}",
                    String::from_utf8_lossy(&buf[..n])
                );
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        get(&server, "/v2/").assert_status(200);
    }
}

#[test]
fn many_parallel_clients_pull_and_push_with_every_byte_verified() {
    let server = Server::start();
    let shared = push_image(&server, "par/shared", Some("latest"), 1);
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let server_addr = server.addr;
            let shared_manifest = shared.manifest.clone();
            let shared_layers: Vec<(String, Vec<u8>)> = shared
                .layers
                .iter()
                .map(|l| (sha256(l), l.clone()))
                .collect();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let url = |p: &str| format!("http://{server_addr}{p}");
                for i in 0..10u64 {
                    // Push a distinct blob through the public port…
                    let bytes =
                        common::random_bytes(64 * 1024 + (t * 100 + i) as usize, t * 1000 + i);
                    let d = sha256(&bytes);
                    let r = client
                        .post(url(&format!("/v2/par/t{t}/blobs/uploads/?digest={d}")))
                        .body(bytes.clone())
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 201);
                    // …pull it back, and pull the shared image.
                    let got = client
                        .get(url(&format!("/v2/par/t{t}/blobs/{d}")))
                        .send()
                        .unwrap()
                        .bytes()
                        .unwrap();
                    assert_eq!(sha256(&got), d);
                    let m = client
                        .get(url("/v2/par/shared/manifests/latest"))
                        .send()
                        .unwrap()
                        .bytes()
                        .unwrap();
                    assert_eq!(m.as_ref(), shared_manifest.as_slice());
                    for (digest, layer) in &shared_layers {
                        let got = client
                            .get(url(&format!("/v2/par/shared/blobs/{digest}")))
                            .send()
                            .unwrap()
                            .bytes()
                            .unwrap();
                        assert_eq!(got.as_ref(), layer.as_slice());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn sigterm_finishes_an_inflight_download_then_stops_both_planes() {
    let mut server = Server::start();
    let big = common::random_bytes(48 << 20, 5);
    let d = push_blob(&server, "term/app", &big);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("GET /v2/term/app/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    // Read a little, so the response is in flight, then ask the server to stop.
    let mut first = [0u8; 4096];
    s.read_exact(&mut first).unwrap();
    let children = server.children();
    assert_eq!(
        children.len(),
        2,
        "serve runs a control plane and a data plane"
    );
    // SAFETY: signalling the server process we started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let mut all = first.to_vec();
    all.extend_from_slice(&rest);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        sha256(&all[split..]),
        d,
        "the whole blob arrived despite SIGTERM"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.alive() {
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in children {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/status")).exists() || is_zombie(pid),
            "child {pid} still runs"
        );
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| s.contains("State:\tZ"))
}

#[test]
fn a_dying_plane_is_reported_and_stops_the_pair() {
    // The control plane is started first, the data plane once the control socket answers.
    for (role, pick) in [("data plane", true), ("control plane", false)] {
        let mut server = Server::start();
        let children = server.children();
        assert_eq!(children.len(), 2);
        let victim = if pick {
            *children.iter().max().unwrap()
        } else {
            *children.iter().min().unwrap()
        };
        // SAFETY: killing a process we started.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.alive() {
            assert!(
                Instant::now() < deadline,
                "supervisor did not notice the {role} died"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = server.log_lines().join("\n");
        assert!(
            log.contains(&format!("{role} exited unexpectedly")),
            "{log}"
        );
        for pid in children {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}/status")).exists() || is_zombie(pid),
                "child {pid} still runs after the {role} died"
            );
        }
    }
}

/// Issue: a push is visible to the data plane as soon as the control plane acknowledges it: no
/// stale tag after a successful PUT, even though the data plane caches resolved tags.
#[test]
fn a_retagged_manifest_is_served_as_soon_as_the_push_is_acknowledged() {
    let server = Server::start();
    let mut previous = String::new();
    for i in 0..40u64 {
        let image = push_image(&server, "retag/app", Some("moving"), 1000 + i);
        assert_ne!(image.digest, previous);
        let r = get(&server, "/v2/retag/app/manifests/moving");
        r.assert_status(200);
        assert_eq!(r.header("docker-content-digest"), image.digest, "round {i}");
        assert_eq!(r.body, image.manifest);
        let h = head(&server, "/v2/retag/app/manifests/moving");
        assert_eq!(h.header("docker-content-digest"), image.digest, "round {i}");
        previous = image.digest;
    }
    // And a deleted tag is gone at once.
    delete(&server, "/v2/retag/app/manifests/moving").assert_status(202);
    get(&server, "/v2/retag/app/manifests/moving").assert_error(404, "MANIFEST_UNKNOWN");
}
