//! The fastest a `sendfile` server can answer one fixed GET on this machine, for
//! `benches/loadtest.py`: the bound its ratios are read against.
//!
//! A thread per `--threads` (default 1), each with its own epoll, edge-triggered, taking
//! connections from one listener (`EPOLLEXCLUSIVE`, as nginx's workers do), non-blocking sockets
//! with `TCP_NODELAY` (and `TCP_NOTSENT_LOWAT` if given, as Lighter's `send_unsent_max_bytes`).
//! It parses nothing: every request head (up to its blank line) gets the same answer, built once
//! at start.
//! A body up to 16 KiB is read into memory and goes out with its head in one `send` (answers to
//! pipelined requests are gathered into one `send`); a larger one goes out as its head (with
//! `MSG_MORE`) then `sendfile` from the file, as nginx sends it. The head is the minimum HTTP/1.1
//! allows (status line, `Content-Length`, `Content-Type`, `Content-Range` for a 206). So no
//! server that sends these bytes with `sendfile` over TCP can spend less per request: what this
//! reaches with one core is the ceiling for Lighter and nginx alike, and a ratio to nginx it
//! cannot reach is one no registry can.
//!
//! ```text
//! bound --listen 127.0.0.1:PORT --file PATH [--offset N] [--length N] [--status 200|206]
//!       [--content-type T] [--notsent-lowat-bytes N] [--threads N]
//! ```
//!
//! It runs until killed and prints `listening on http://ADDR` once ready.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::FileExt;

/// Bodies up to this size are answered from memory, head and body in one `send`.
const IN_MEMORY_MAX_BYTES: u64 = 16 * 1024;
/// A request head longer than this closes the connection (wrk's are ~100 bytes).
const HEAD_MAX_BYTES: usize = 8 * 1024;
/// Answers to pipelined requests gathered into one `send`, at most this many bytes.
const GATHER_MAX_BYTES: usize = 64 * 1024;
const EVENTS: usize = 256;

struct Args {
    listen: SocketAddr,
    file: String,
    offset: u64,
    length: Option<u64>,
    status: u16,
    content_type: String,
    notsent_lowat: u32,
    threads: usize,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "bound: {why}\nusage: bound --listen ADDR --file PATH [--offset N] [--length N] \
         [--status 200|206] [--content-type T] [--notsent-lowat-bytes N] [--threads N]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        file: String::new(),
        offset: 0,
        length: None,
        status: 200,
        content_type: "application/octet-stream".into(),
        notsent_lowat: 0,
        threads: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = |v: &str| {
            v.parse::<u64>()
                .unwrap_or_else(|_| usage(&format!("{flag} {v}")))
        };
        match flag.as_str() {
            "--listen" => a.listen = value.parse().unwrap_or_else(|_| usage("bad --listen")),
            "--file" => a.file = value,
            "--offset" => a.offset = number(&value),
            "--length" => a.length = Some(number(&value)),
            "--status" => a.status = number(&value) as u16,
            "--content-type" => a.content_type = value,
            "--notsent-lowat-bytes" => a.notsent_lowat = number(&value) as u32,
            "--threads" => a.threads = number(&value).clamp(1, 256) as usize,
            _ => usage(&format!("unknown {flag}")),
        }
    }
    if a.file.is_empty() {
        usage("--file is required");
    }
    if a.status != 200 && a.status != 206 {
        usage("--status is 200 or 206");
    }
    a
}

/// The one answer, built once.
struct Answer {
    file: File,
    offset: u64,
    length: u64,
    /// The head, then (for a body answered from memory) the body.
    bytes: Vec<u8>,
    from_memory: bool,
}

impl Answer {
    fn new(a: &Args) -> io::Result<Answer> {
        let file = File::open(&a.file)?;
        let size = file.metadata()?.len();
        let length = a.length.unwrap_or(size.saturating_sub(a.offset));
        if a.offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(io::Error::other(
                "--offset and --length go past the file's end",
            ));
        }
        let mut bytes = Vec::new();
        let reason = if a.status == 206 {
            "Partial Content"
        } else {
            "OK"
        };
        write!(
            bytes,
            "HTTP/1.1 {} {reason}\r\nContent-Length: {length}\r\n",
            a.status
        )?;
        write!(bytes, "Content-Type: {}\r\n", a.content_type)?;
        if a.status == 206 {
            let last = (a.offset + length).saturating_sub(1);
            write!(bytes, "Content-Range: bytes {}-{last}/{size}\r\n", a.offset)?;
        }
        bytes.extend_from_slice(b"\r\n");
        let from_memory = length <= IN_MEMORY_MAX_BYTES;
        if from_memory {
            let head = bytes.len();
            bytes.resize(head + length as usize, 0);
            file.read_exact_at(&mut bytes[head..], a.offset)?;
        }
        Ok(Answer {
            file,
            offset: a.offset,
            length,
            bytes,
            from_memory,
        })
    }
}

#[derive(Default)]
struct Conn {
    /// Bytes of a request head not yet complete.
    partial: Vec<u8>,
    /// Requests read and not yet answered (pipelining).
    owed: u64,
    /// The answer under way: bytes of `Answer::bytes` already sent (from memory, possibly a
    /// gathered batch in `out`), or of the head then the file.
    out: Vec<u8>,
    out_sent: usize,
    file_sent: Option<u64>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Counts the request heads that end in `data`, keeping the tail of one not yet ended.
/// False: a head too long.
fn take_requests(conn: &mut Conn, data: &[u8]) -> bool {
    conn.partial.extend_from_slice(data);
    let mut start = 0;
    while let Some(end) = conn.partial[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
    {
        conn.owed += 1;
        start += end + 4;
    }
    conn.partial.drain(..start);
    conn.partial.len() <= HEAD_MAX_BYTES
}

/// Sends what is owed until done or the socket is full. Err: close the connection.
fn answer(fd: RawFd, conn: &mut Conn, ans: &Answer) -> io::Result<()> {
    loop {
        if conn.out_sent == conn.out.len() && conn.file_sent.is_none() {
            if conn.owed == 0 {
                return Ok(());
            }
            conn.out.clear();
            conn.out_sent = 0;
            if ans.from_memory {
                while conn.owed > 0
                    && conn.out.len() + ans.bytes.len() <= GATHER_MAX_BYTES.max(ans.bytes.len())
                {
                    conn.out.extend_from_slice(&ans.bytes);
                    conn.owed -= 1;
                }
            } else {
                conn.out.extend_from_slice(&ans.bytes);
                conn.owed -= 1;
                conn.file_sent = Some(0);
            }
        }
        while conn.out_sent < conn.out.len() {
            let more = if conn.file_sent.is_some() {
                libc::MSG_MORE
            } else {
                0
            };
            let rest = &conn.out[conn.out_sent..];
            // SAFETY: `rest` is a live slice; fd is a socket this loop owns.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | more,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            conn.out_sent += n as usize;
        }
        if let Some(sent) = conn.file_sent {
            let mut off = (ans.offset + sent) as libc::off_t;
            let left = ans.length - sent;
            // SAFETY: both descriptors are open; `off` is a local the call advances.
            let n = unsafe { libc::sendfile(fd, ans.file.as_raw_fd(), &mut off, left as usize) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::other("the file ended early"));
            }
            let sent = sent + n as u64;
            conn.file_sent = if sent == ans.length { None } else { Some(sent) };
        }
    }
}

fn close(ep: RawFd, fd: RawFd, conns: &mut HashMap<RawFd, Conn>) {
    conns.remove(&fd);
    // SAFETY: fd is a socket this loop accepted and owns.
    unsafe {
        libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
        libc::close(fd);
    }
}

/// One thread's loop: connections it accepts from `lfd` are its own until they close.
fn serve(a: &Args, ans: &Answer, lfd: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls on descriptors owned here; every pointer is to a live local.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        u64: lfd as u64,
    };
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev) })?;

    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for e in &events[..n as usize] {
            let fd = e.u64 as RawFd;
            if fd == lfd {
                loop {
                    let c = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if c < 0 {
                        break; // EAGAIN, or a connection that went away: the next one waits
                    }
                    let one: libc::c_int = 1;
                    let int = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    unsafe {
                        let p = (&one as *const libc::c_int).cast();
                        libc::setsockopt(c, libc::IPPROTO_TCP, libc::TCP_NODELAY, p, int);
                        if a.notsent_lowat > 0 {
                            let v = (&a.notsent_lowat as *const u32).cast();
                            libc::setsockopt(c, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, v, int);
                        }
                    }
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET)
                            as u32,
                        u64: c as u64,
                    };
                    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c, &mut ev) } < 0 {
                        unsafe { libc::close(c) };
                        continue;
                    }
                    conns.insert(c, Conn::default());
                }
                continue;
            }
            let Some(conn) = conns.get_mut(&fd) else {
                continue;
            };
            let mut ok = true;
            if e.events
                & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                != 0
            {
                loop {
                    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if r > 0 {
                        if !take_requests(conn, &buf[..r as usize]) {
                            ok = false;
                            break;
                        }
                        if (r as usize) < buf.len() {
                            break;
                        }
                    } else if r == 0 {
                        ok = false;
                        break;
                    } else {
                        let err = io::Error::last_os_error();
                        ok = would_block(&err) || err.kind() == io::ErrorKind::Interrupted;
                        break;
                    }
                }
            }
            if ok {
                if let Err(err) = answer(fd, conn, ans) {
                    ok = would_block(&err);
                }
            }
            if !ok {
                close(ep, fd, &mut conns);
            }
        }
    }
}

fn main() {
    let a = args();
    let ans = Answer::new(&a).unwrap_or_else(|e| usage(&format!("{}: {e}", a.file)));
    let listener = TcpListener::bind(a.listen).unwrap_or_else(|e| usage(&format!("bind: {e}")));
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let addr = listener.local_addr().expect("the listener's address");
    let lfd = listener.into_raw_fd();
    println!("listening on http://{addr}");
    let _ = io::stdout().flush();
    std::thread::scope(|s| {
        for _ in 0..a.threads {
            s.spawn(|| {
                if let Err(e) = serve(&a, &ans, lfd) {
                    eprintln!("bound: {e}");
                    std::process::exit(1);
                }
            });
        }
    });
}
