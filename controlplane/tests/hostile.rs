//! Hostile clients (issue 13, "Hardening"): request heads sent a byte at a time (slowloris),
//! bodies that trickle or stall, thousands of idle connections, a flood of new connections and
//! pipelined garbage. Through all of it the registry keeps serving: a well-behaved client's pulls
//! and pushes are answered (within the tests' generous timeouts; no latency is asserted), hostile
//! connections are cut by the limits named in the configuration, and errors are the right 4xx or
//! a close. The memory figures at 20,000 idle connections come from `benches/hostile.py`.

mod common;
mod oci;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use oci::*;

/// Longest a test waits for anything it expects the server to do.
const WAIT: Duration = Duration::from_secs(20);

/// A blob to pull throughout, and its digest.
fn seed_blob(server: &Server) -> (Vec<u8>, String) {
    let bytes = common::random_bytes(256 << 10, 0x5105);
    let digest = push_blob(server, "hostile/app", &bytes);
    (bytes, digest)
}

/// The well-behaved client: a pull of the blob (data plane) and a push (control plane) answered
/// with the right bytes and codes.
fn assert_well_behaved_client_served(server: &Server, blob: &[u8], digest: &str, seed: u64) {
    let r = get(server, &format!("/v2/hostile/app/blobs/{digest}"));
    assert_eq!(r.status, 200, "pull refused: {}", r.describe());
    assert!(r.body == blob, "pull returned other bytes");
    let pushed = common::random_bytes(10_000, seed);
    let d = push_blob(server, "hostile/app", &pushed);
    assert_eq!(
        get(server, &format!("/v2/hostile/app/blobs/{d}")).body,
        pushed
    );
}

/// Resident memory (VmRSS, KiB) of the control plane and the data plane.
fn planes_rss_kib(server: &Server) -> Vec<(String, u64)> {
    server
        .children()
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let plane = match String::from_utf8_lossy(&cmdline) {
                c if c.contains("control-plane") => "control plane",
                c if c.contains("data-plane") => "data plane",
                _ => return None,
            };
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches(" kB")
                .parse()
                .ok()?;
            Some((plane.to_owned(), kib))
        })
        .collect()
}

/// A connection that the server has closed reads EOF (or a reset); one still open times out.
fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an answer (say a 408): the close follows
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Raises this process's open-file limit (the server it starts inherits it): the hard limit to
/// 65536 if it may (root), the soft one to the hard one. Returns the soft limit.
fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_max < 65536 {
            let raised = libc::rlimit {
                rlim_cur: 65536,
                rlim_max: 65536,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return 65536;
            }
        }
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        r.rlim_cur
    }
}

// RFC 9112 / slowloris: a request head sent a byte at a time is cut once
// `request_header_timeout_ms` has passed since it began, however steadily its bytes come; the
// registry serves others meanwhile.
#[test]
fn slowloris_heads_are_cut_at_request_header_timeout() {
    const CONNECTIONS: usize = 50;
    let server = Server::start_args(&["--request-header-timeout-ms", "1000"]);
    let (blob, digest) = seed_blob(&server);
    let started = Instant::now();
    let cut = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for i in 0..CONNECTIONS {
            let (server, cut, digest) = (&server, &cut, &digest);
            scope.spawn(move || {
                // Pulls (answered by the data plane) and pushes (handed over once complete).
                let head = match i % 2 {
                    0 => format!("GET /v2/hostile/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"),
                    _ => "PATCH /v2/hostile/app/blobs/uploads/x HTTP/1.1\r\nHost: x\r\n".into(),
                };
                let filler = "X-Slow: a\r\n".repeat(1000);
                let mut s = TcpStream::connect(server.addr).unwrap();
                // A byte every 200 ms: the head never completes, and never pauses for long.
                for b in head.bytes().chain(filler.bytes()) {
                    if s.write_all(&[b]).is_err()
                        || closed_by_server(&mut s, Duration::from_millis(200))
                    {
                        cut.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    assert!(started.elapsed() < WAIT, "a slowloris head was never cut");
                }
                panic!("the whole slow head was read without the connection being cut");
            });
        }
        // Meanwhile, a well-behaved client is served.
        std::thread::sleep(Duration::from_millis(300));
        assert_well_behaved_client_served(&server, &blob, &digest, 1);
    });
    assert_eq!(cut.load(Ordering::SeqCst), CONNECTIONS);
    eprintln!(
        "{CONNECTIONS} slowloris heads cut within {:?}",
        started.elapsed()
    );
    assert_well_behaved_client_served(&server, &blob, &digest, 2);
}

/// Sends `head`, then `body` a byte every `every` from another thread until the server stops
/// reading; returns what the server answered (read until it closes, or `WAIT`).
fn trickle(server: &Server, head: &str, body: &[u8], every: Duration) -> String {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let stop = AtomicBool::new(false);
    let answer = std::thread::scope(|scope| {
        let mut writer = s.try_clone().unwrap();
        let stop = &stop;
        scope.spawn(move || {
            for b in body {
                if stop.load(Ordering::SeqCst) || writer.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
        });
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        stop.store(true, Ordering::SeqCst);
        String::from_utf8_lossy(&answer).into_owned()
    });
    answer
}

// Issue 13: a request body that trickles (a byte now and then, never pausing for
// request_body_idle_timeout_ms) or stalls is cut by the control plane with 408 and the spec's
// error code, for blob uploads (Content-Length or chunked) and manifests alike; a well-behaved
// push goes through meanwhile.
#[test]
fn trickling_or_stalled_bodies_are_cut_with_408() {
    let server = Server::start_args(&[
        "--request-body-idle-timeout-ms",
        "1000",
        "--request-body-rate-min-bytes-per-sec",
        "200",
        "--lingering-close-ms",
        "500",
    ]);
    let (blob, digest) = seed_blob(&server);
    let every = Duration::from_millis(300); // under the idle timeout, far under 200 bytes/s
    let body = vec![b'x'; 100_000];
    let upload = |chunked: bool| {
        let location = start_upload(&server, "hostile/app");
        let framing = match chunked {
            true => "Transfer-Encoding: chunked",
            false => "Content-Length: 100000",
        };
        format!(
            "PATCH {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n{framing}\r\n\r\n",
            location_path(&location)
        )
    };
    let manifest_put = "PUT /v2/hostile/app/manifests/slow HTTP/1.1\r\nHost: x\r\n\
        Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n";
    // A chunked body's first chunk: 100000 bytes announced, then trickled.
    let mut chunked_body = b"186a0\r\n".to_vec();
    chunked_body.extend_from_slice(&body);
    let cases: [(&str, String, &[u8], &str); 4] = [
        (
            "upload, Content-Length",
            upload(false),
            &body,
            "BLOB_UPLOAD_INVALID",
        ),
        (
            "upload, chunked",
            upload(true),
            &chunked_body,
            "BLOB_UPLOAD_INVALID",
        ),
        (
            "manifest",
            manifest_put.into(),
            &body[..1000],
            "MANIFEST_INVALID",
        ),
        // No byte at all: before request_body_rate_min_bytes_per_sec, a manifest body that
        // never came held its connection forever.
        (
            "manifest, stalled",
            manifest_put.into(),
            &[],
            "MANIFEST_INVALID",
        ),
    ];
    std::thread::scope(|scope| {
        let mut cut = Vec::new();
        for (what, head, body, code) in cases {
            let server = &server;
            cut.push(scope.spawn(move || {
                let started = Instant::now();
                let answer = trickle(server, &head, body, every);
                eprintln!("{what}: cut after {:?}", started.elapsed());
                assert_eq!(raw_status(&answer), Some(408), "{what}: {answer:?}");
                assert_eq!(
                    raw_error_code(&answer).as_deref(),
                    Some(code),
                    "{what}: {answer}"
                );
                assert!(
                    answer.contains("request_body_rate_min_bytes_per_sec")
                        || answer.contains("request_body_idle_timeout_ms"),
                    "{what}: the answer names the limit: {answer}"
                );
            }));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_well_behaved_client_served(&server, &blob, &digest, 3);
        for c in cut {
            c.join().unwrap();
        }
    });
    // Nothing of the slow manifests was stored.
    let r = get(&server, "/v2/hostile/app/manifests/slow");
    assert_eq!(r.status, 404, "{}", r.describe());
    assert_well_behaved_client_served(&server, &blob, &digest, 4);
}

// Thousands of idle connections (opened and silent, or idle after a keep-alive answer), under
// `connections_per_core_max`: a well-behaved client's pull and push are still answered.
#[test]
fn thousands_of_idle_connections_leave_a_well_behaved_client_served() {
    const IDLE: usize = 3000;
    let limit = raise_nofile_limit();
    assert!(
        limit > 2 * IDLE as u64 + 200,
        "RLIMIT_NOFILE {limit} is too low for {IDLE} connections"
    );
    let server = Server::start();
    let (blob, digest) = seed_blob(&server);
    let before = planes_rss_kib(&server);
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = TcpStream::connect(server.addr).expect("connect an idle connection");
        if i % 2 == 1 {
            // One request answered, then idle on a kept-alive connection.
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 1024];
            s.set_read_timeout(Some(WAIT)).unwrap();
            let n = s.read(&mut buf).expect("an answer to GET /v2/");
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        idle.push(s);
    }
    assert_well_behaved_client_served(&server, &blob, &digest, 5);
    let during = planes_rss_kib(&server);
    eprintln!("RSS (KiB) before {before:?}, with {IDLE} idle connections {during:?}");
    // The idle connections are still open (idle_timeout_ms is 60 s): they were held, not shed.
    let mut open = 0;
    for s in idle.iter_mut().step_by(100) {
        if !closed_by_server(s, Duration::from_millis(10)) {
            open += 1;
        }
    }
    assert_eq!(
        open,
        IDLE.div_ceil(100),
        "idle connections were closed early"
    );
    drop(idle);
    assert_well_behaved_client_served(&server, &blob, &digest, 6);
}

/// Closes a socket with a reset (SO_LINGER 0), so a flood leaves no TIME_WAIT behind.
fn reset_close(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a local struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

// A flood of new connections (connect and reset, half a head, a whole request never read,
// garbage): the registry keeps serving a well-behaved client throughout and afterwards.
#[test]
fn a_flood_of_new_connections_leaves_the_server_serving() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 5000;
    raise_nofile_limit();
    let server = Server::start();
    let (blob, digest) = seed_blob(&server);
    let done = AtomicUsize::new(0);
    let (mut served, mut rss_peak) = (0, Vec::new());
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (server, done, digest) = (&server, &done, &digest);
            scope.spawn(move || {
                for i in 0..PER_THREAD {
                    let Ok(mut s) = TcpStream::connect(server.addr) else {
                        continue; // a full accept queue may refuse: that is the flood's problem
                    };
                    let _ = match (t + i) % 4 {
                        0 => Ok(()),
                        1 => s.write_all(b"GET /v2/hostile/app/blo"),
                        2 => s.write_all(
                            format!(
                                "GET /v2/hostile/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n"
                            )
                            .as_bytes(),
                        ),
                        _ => s.write_all(
                            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
                        ),
                    };
                    reset_close(s);
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let started = Instant::now();
        while done.load(Ordering::SeqCst) < THREADS as usize {
            assert!(started.elapsed() < 6 * WAIT, "the flood did not end");
            assert_well_behaved_client_served(&server, &blob, &digest, 100 + served);
            served += 1;
            let rss = planes_rss_kib(&server);
            if rss.iter().map(|(_, k)| k).sum::<u64>() > rss_peak.iter().map(|(_, k)| k).sum() {
                rss_peak = rss;
            }
        }
    });
    eprintln!(
        "{} connections flooded in; a well-behaved client served {served} times meanwhile; \
         RSS (KiB) at its highest sample {rss_peak:?}",
        THREADS * PER_THREAD
    );
    assert!(
        served > 0,
        "the flood ended before the client's first request"
    );
    assert_well_behaved_client_served(&server, &blob, &digest, 7);
}

/// Sends `bytes` on a new connection and reads until the server closes it (or `WAIT`).
fn exchange(server: &Server, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let closed = match s.read_to_end(&mut out) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The status codes of the responses in `raw`, in order.
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw[i + 9..].get(..3)?.parse().ok())
        .collect()
}

// RFC 9112 section 2.2 and 9.3.2 (pipelining): garbage after, or instead of, valid requests is
// answered 400 (an oversized head 431) and the connection closed, after the valid requests
// before it were answered in order; the registry keeps serving.
#[test]
fn pipelined_garbage_is_answered_400_and_closed() {
    let server = Server::start();
    let (blob, digest) = seed_blob(&server);
    let get_v2 = "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let get_blob = format!("HEAD /v2/hostile/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n");
    let tls_hello = "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n";

    let (raw, closed) = exchange(&server, tls_hello.as_bytes());
    assert_eq!(statuses(&raw), [400], "{raw}");
    assert!(closed);

    let mut pipeline = String::new();
    for _ in 0..50 {
        pipeline.push_str(get_v2);
        pipeline.push_str(&get_blob);
    }
    pipeline.push_str("GARBAGE / HTTP/9.9 \0\r\n\r\n");
    pipeline.push_str(get_v2); // never answered: the connection closes at the garbage
    let (raw, closed) = exchange(&server, pipeline.as_bytes());
    let mut want = vec![200; 100];
    want.push(400);
    assert_eq!(statuses(&raw), want, "{raw}");
    assert!(closed, "the connection stays open after garbage");

    let huge = format!(
        "GET /v2/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(32 << 10)
    );
    let (raw, closed) = exchange(&server, huge.as_bytes());
    assert_eq!(statuses(&raw), [431], "{raw}");
    assert!(closed);

    // A request the data plane hands over, with garbage pipelined behind it: the control plane
    // answers that one request and gives the connection back with the garbage, which the data
    // plane answers 400 before closing.
    let handed =
        "POST /v2/hostile/app/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n\
        \x00\x01\x02 garbage\r\n\r\n";
    let (raw, closed) = exchange(&server, handed.as_bytes());
    assert_eq!(statuses(&raw), [202, 400], "{raw}");
    assert!(closed);

    assert_well_behaved_client_served(&server, &blob, &digest, 8);
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime, fields 14 and 15 of stat(5), in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

// Descriptors run out before connections_per_core_max is reached (the data plane lowers the
// limit to fit RLIMIT_NOFILE, but never below 16 connections a core; a limit of 20 descriptors
// is below even that): the data plane neither dies (epoll's accept error used to end its cores)
// nor spins on the connection it cannot accept (io_uring re-armed the failed accept at once,
// epoll's level-triggered listener woke every wait), and once descriptors are free again the
// client that waited in the listen queue is served. Both engines.
#[test]
fn running_out_of_descriptors_neither_kills_nor_spins_the_data_plane() {
    const IDLE: usize = 300;
    raise_nofile_limit();
    for engine in ["io_uring", "epoll"] {
        let launch = |l: common::Launch| {
            l.args(&["--io-engine", engine, "--cores", "1"])
                .nofile_max(20)
        };
        let server = Server::launch_temp(launch);
        let data_plane = server
            .children()
            .into_iter()
            .find(|&pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains("data-plane")
            })
            .expect("the data plane's pid");
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|_| TcpStream::connect(server.addr).expect("connect (the listen queue holds it)"))
            .collect();
        // A well-behaved client queued behind them.
        let mut waiting = TcpStream::connect(server.addr).unwrap();
        waiting
            .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let descriptors =
            || std::fs::read_dir(format!("/proc/{data_plane}/fd")).map_or(0, |d| d.count());
        let started = Instant::now();
        while descriptors() < 19 {
            assert!(
                started.elapsed() < WAIT,
                "{engine}: the data plane never ran out of descriptors ({} open)",
                descriptors()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A busy loop burns a whole core (at least a quarter of one, on a machine shared with
        // other tests); a data plane waiting for descriptors burns nothing.
        let (cpu, wall) = (cpu_time(data_plane), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let burnt = cpu_time(data_plane) - cpu;
        assert!(
            burnt < wall.elapsed() / 4,
            "{engine}: the data plane spent {burnt:?} of CPU in {:?} while it could not accept",
            wall.elapsed()
        );
        assert!(
            server
                .wait_for_log("cannot accept connections: Too many open files", WAIT)
                .is_some(),
            "{engine}: the log does not say why connections wait"
        );
        drop(idle);
        waiting.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = [0u8; 12];
        waiting
            .read_exact(&mut answer)
            .unwrap_or_else(|e| panic!("{engine}: the queued client got no answer: {e}"));
        assert_eq!(&answer, b"HTTP/1.1 200", "{engine}");
        assert_alive(&server);
    }
}

/// A client that asks the control plane for a large answer and then stops reading has its
/// connection closed once `response_idle_timeout_ms` passes without a byte taken (nginx's
/// `send_timeout`); it gets what the socket buffers held, never the whole answer, and the
/// control plane goes on serving clients that read.
#[test]
fn a_client_that_stops_reading_an_answer_is_cut_after_response_idle_timeout() {
    let control = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let server = Server::start_args(&[
        "--control-listen",
        &control,
        "--response-idle-timeout-ms",
        "1000",
    ]);
    // Larger than what loopback's socket buffers hold on both sides together.
    let blob = common::random_bytes(48 << 20, 0x5e4d);
    let digest = push_blob(&server, "hostile/big", &blob);
    let mut s = TcpStream::connect(&control).unwrap();
    write!(
        s,
        "GET /v2/hostile/big/blobs/{digest} HTTP/1.1\r\nHost: lighter\r\n\r\n"
    )
    .unwrap();
    // Three times the timeout without reading a byte...
    std::thread::sleep(Duration::from_secs(3));
    // ...then everything there is: the buffered part, then the close.
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                panic!("the stalled answer was neither sent nor closed: {e} after {got} bytes")
            }
        }
    }
    assert!(
        got > 0 && got < blob.len(),
        "a client that stopped reading for 3 s got {got} of {} bytes: the connection was not cut",
        blob.len()
    );
    // Clients that read are served as before, by the control plane and through the data plane.
    let r = Server::client()
        .get(format!("http://{control}/v2/hostile/big/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().unwrap() == blob,
        "the control plane sent other bytes"
    );
    let r = get(&server, &format!("/v2/hostile/big/blobs/{digest}"));
    assert_eq!(r.status, 200);
    assert!(r.body == blob);
}
