//! The data plane's event rings: what each core served, for the control plane to log and count.
//!
//! Each core of the data plane owns one ring: a file under `<data-dir>/run/events/`
//! (`core-<n>.ring`), memory-mapped by the core, which writes, and by the control plane, which
//! reads. Nothing else is shared, and neither side ever waits for the other:
//!
//! - the core writes a [`Record`] at `head`, packed (its fixed part, then each text field up to
//!   its length, one after the other, from a cache line's start) and moves `head` on (release);
//!   when the ring has no room (the control plane has not drained it) the record is dropped
//!   and `dropped` counts it. No allocation, no system call: a copy into the page cache.
//! - the control plane reads from `tail` up to `head` (acquire) and moves `tail` on.
//! - the core's counters (requests by route and status class, bytes, handoffs, connections, a
//!   latency histogram) live in the same header, written by the core alone and read as they are.
//!
//! With the event log off (`events_ring_records = 0`) a core still makes its ring, of capacity
//! 0: the header alone, for its counters. It writes no record into it, and a reader finds none.
//!
//! A data plane that restarts makes a new ring (a new file renamed over the old one): records
//! the control plane had not drained from the old one are read from its mapping and then it is
//! dropped, so a crash loses at most what the control plane had not drained (at most the ring's
//! records, a fraction of a second of pulls; the control plane drains every 250 ms).
//!
//! ```text
//! 0      magic "LGHTEVT2"      8  alignment (64)        16 capacity (bytes)     24 started (unix µs)
//! 64     head (byte position of the next record the core writes; it only grows)
//! 128    tail (byte position of the next record the control plane reads)
//! 192    dropped
//! 256    counters: [u64; COUNTERS]
//! 4096   records: capacity bytes, then PACKED_MAX_BYTES of slack: a record that starts near
//!        the end runs on into the slack instead of wrapping, so each is one contiguous copy
//! ```
//!
//! A packed record takes its fixed part (`FIXED_BYTES`) and its fields' lengths, rounded up to
//! 64 bytes: a pull's is about 150–250 bytes, three or four cache lines, so a ring of `n` KiB
//! holds at least `n` records and typically four to six times as many. A by-digest request's
//! reference is its digest: it is written once (`REFERENCE_IS_DIGEST`).
//!
//! A reader also takes the rings of earlier versions (magic "LGHTEVT1": fixed slots of
//! `RECORD_BYTES` or `RECORD_BYTES_V1` bytes, a capacity in records), which a data plane of
//! that version may have left unread.

use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// `LGHTEVT2`, little-endian: a ring of packed records.
pub const MAGIC: u64 = u64::from_le_bytes(*b"LGHTEVT2");
/// `LGHTEVT1`: a ring of fixed slots (read, no longer written).
pub const MAGIC_SLOTS: u64 = u64::from_le_bytes(*b"LGHTEVT1");
/// Bytes of one record unpacked (and of a slot in an `LGHTEVT1` ring). A ring made for `n`
/// records has `n` × this many bytes: room for `n` of the largest records.
pub const RECORD_BYTES: usize = 1024;
/// Packed records start at multiples of this: a cache line, so a record touches as few as its
/// length allows.
pub const PACKED_ALIGN: usize = 64;
/// The most bytes a packed record takes (its fixed part and every field full), rounded up.
pub const PACKED_MAX_BYTES: usize =
    (Record::FIXED_BYTES + 255 + 128 + 136 + 128 + 255).next_multiple_of(PACKED_ALIGN);
/// The room [`RingWriter::has_room`] asks for: a pull's record, packed.
const ROOM_TYPICAL_BYTES: u64 = 4 * PACKED_ALIGN as u64;
/// Bytes of a record before `identity` was added: the same fields at the same offsets, so a
/// ring of such records (a data plane of the previous version) is still read, without
/// identities.
pub const RECORD_BYTES_V1: usize = 768;
/// Bytes before the first record.
const HEADER_BYTES: usize = 4096;
/// The alignment of packed records, or (`LGHTEVT1`) the bytes of a slot.
const OFF_RECORD_BYTES: usize = 8;
const OFF_CAPACITY: usize = 16;
const OFF_STARTED: usize = 24;
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
const OFF_DROPPED: usize = 192;
const OFF_COUNTERS: usize = 256;

/// The kinds of route counted, in counter order.
pub const ROUTES: [&str; 5] = ["base", "manifest", "blob", "health", "other"];
/// The status classes counted, in counter order.
pub const STATUS_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
/// Upper bounds (µs) of the latency histogram's buckets; the last bucket is everything above.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// The counters of a ring, by index.
pub mod counter {
    /// Requests answered: `REQUESTS + route * 4 + status class`.
    pub const REQUESTS: usize = 0;
    /// Bytes of responses sent (heads and bodies).
    pub const BYTES_SENT: usize = 20;
    /// Requests handed to the control plane.
    pub const HANDOFFS: usize = 21;
    /// Connections the control plane gave back.
    pub const RETURNS: usize = 22;
    /// Connections accepted.
    pub const ACCEPTED: usize = 23;
    /// Connections open now (a gauge).
    pub const OPEN: usize = 24;
    /// Idle connections closed to take new ones (a full core).
    pub const EVICTED: usize = 25;
    /// The event loop: 1 io_uring, 2 epoll (a gauge).
    pub const ENGINE: usize = 26;
    /// The CPU the core's thread is pinned to, plus one; 0: it floats (a gauge). The control
    /// plane keeps its drain off pinned CPUs.
    pub const PINNED_CPU: usize = 27;
    /// Pull-path latency (request parsed to last byte sent): `LATENCY + bucket`.
    pub const LATENCY: usize = 28;
    /// The sum of those latencies, µs.
    pub const LATENCY_SUM_US: usize = 45;
}
/// Counters in a ring's header.
pub const COUNTERS: usize = 48;

/// What a record says was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Action {
    ManifestGet = 1,
    ManifestHead = 2,
    BlobGet = 3,
    BlobHead = 4,
}

impl Action {
    pub fn from_u8(v: u8) -> Option<Action> {
        Some(match v {
            1 => Action::ManifestGet,
            2 => Action::ManifestHead,
            3 => Action::BlobGet,
            4 => Action::BlobHead,
            _ => return None,
        })
    }

    /// The name in logs and queries.
    pub fn name(self) -> &'static str {
        match self {
            Action::ManifestGet => "pull_manifest",
            Action::ManifestHead => "head_manifest",
            Action::BlobGet => "pull_blob",
            Action::BlobHead => "head_blob",
        }
    }
}

/// One served request, as a core records it. Plain bytes: strings are length-prefixed, cut to
/// their field (the `TRUNCATED` flag then says so).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Record {
    pub time_unix_us: u64,
    pub duration_us: u64,
    pub bytes_sent: u64,
    pub status: u16,
    pub action: u8,
    pub flags: u8,
    /// 0: unknown, 4, 6.
    pub client_family: u8,
    pub repository_len: u8,
    pub reference_len: u8,
    pub digest_len: u8,
    pub agent_len: u8,
    pub identity_len: u8,
    _pad0: [u8; 6],
    pub client: [u8; 16],
    pub repository: [u8; 255],
    pub reference: [u8; 128],
    pub digest: [u8; 136],
    pub agent: [u8; 128],
    _pad1: [u8; 65],
    /// Who made the request (a token's subject); empty: anonymous.
    pub identity: [u8; 255],
    _pad2: [u8; 1],
}

const _: () = assert!(std::mem::size_of::<Record>() == RECORD_BYTES);

impl Record {
    /// A field was cut to fit.
    pub const TRUNCATED: u8 = 1;
    /// The identity was cut to fit (kept apart: it is set before `start`, which clears the
    /// other flag).
    pub const IDENTITY_TRUNCATED: u8 = 2;
    /// In a packed record only: the reference is the digest, whose bytes are not repeated.
    const REFERENCE_IS_DIGEST: u8 = 4;

    pub const fn empty() -> Record {
        Record {
            time_unix_us: 0,
            duration_us: 0,
            bytes_sent: 0,
            status: 0,
            action: 0,
            flags: 0,
            client_family: 0,
            repository_len: 0,
            reference_len: 0,
            digest_len: 0,
            agent_len: 0,
            identity_len: 0,
            _pad0: [0; 6],
            client: [0; 16],
            repository: [0; 255],
            reference: [0; 128],
            digest: [0; 136],
            agent: [0; 128],
            _pad1: [0; 65],
            identity: [0; 255],
            _pad2: [0; 1],
        }
    }

    /// Starts a record: what, of which repository, by which reference (given in pieces,
    /// joined: `["sha256", ":", hex]`, so no caller formats a string).
    pub fn start(&mut self, action: Action, repository: &str, reference: &[&str]) {
        self.action = action as u8;
        self.flags &= Self::IDENTITY_TRUNCATED;
        self.status = 0;
        self.bytes_sent = 0;
        self.digest_len = 0;
        self.repository_len = self.put(Field::Repository, &[repository.as_bytes()]);
        self.reference_len = self.put_str(Field::Reference, reference);
    }

    /// The digest served, in pieces as `start`'s reference.
    pub fn set_digest(&mut self, digest: &[&str]) {
        self.digest_len = self.put_str(Field::Digest, digest);
    }

    pub fn set_agent(&mut self, agent: &[u8]) {
        self.agent_len = self.put(Field::Agent, &[agent]);
    }

    /// Who made the request; empty for anonymous. Kept by `start` (the access check that
    /// finds it comes before), so each request sets it, or clears it, first.
    pub fn set_identity(&mut self, identity: &[u8]) {
        let n = identity.len().min(self.identity.len());
        self.identity[..n].copy_from_slice(&identity[..n]);
        self.identity_len = n as u8;
        self.flags &= !Self::IDENTITY_TRUNCATED;
        if n < identity.len() {
            self.flags |= Self::IDENTITY_TRUNCATED;
        }
    }

    fn put_str(&mut self, field: Field, parts: &[&str]) -> u8 {
        let mut bytes: [&[u8]; 4] = [b""; 4];
        for (b, p) in bytes.iter_mut().zip(parts) {
            *b = p.as_bytes();
        }
        self.put(field, &bytes[..parts.len().min(4)])
    }

    pub fn set_client(&mut self, ip: Option<IpAddr>) {
        match ip {
            None => self.client_family = 0,
            Some(IpAddr::V4(a)) => {
                self.client_family = 4;
                self.client = [0; 16];
                self.client[..4].copy_from_slice(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                self.client_family = 6;
                self.client = a.octets();
            }
        }
    }

    /// Writes `parts` one after the other into the field, cut to fit; the length written.
    fn put(&mut self, field: Field, parts: &[&[u8]]) -> u8 {
        let dst: &mut [u8] = match field {
            Field::Repository => &mut self.repository,
            Field::Reference => &mut self.reference,
            Field::Digest => &mut self.digest,
            Field::Agent => &mut self.agent,
        };
        let mut n = 0;
        let mut cut = false;
        for p in parts {
            let k = p.len().min(dst.len() - n);
            dst[n..n + k].copy_from_slice(&p[..k]);
            n += k;
            cut |= k < p.len();
        }
        if cut {
            self.flags |= Self::TRUNCATED;
        }
        n as u8
    }

    pub fn action(&self) -> Option<Action> {
        Action::from_u8(self.action)
    }

    pub fn client(&self) -> Option<IpAddr> {
        match self.client_family {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(&self.client[..4]).ok()?)),
            6 => Some(IpAddr::from(self.client)),
            _ => None,
        }
    }

    /// The repository's bytes (cut to its length).
    pub fn repository_bytes(&self) -> &[u8] {
        field(&self.repository, self.repository_len)
    }

    pub fn reference_bytes(&self) -> &[u8] {
        field(&self.reference, self.reference_len)
    }

    pub fn digest_bytes(&self) -> &[u8] {
        field(&self.digest, self.digest_len)
    }

    pub fn agent_bytes(&self) -> &[u8] {
        field(&self.agent, self.agent_len)
    }

    pub fn identity_bytes(&self) -> &[u8] {
        field(&self.identity, self.identity_len)
    }

    /// The repository (text cut to its length; lossy if the bytes are not UTF-8).
    pub fn repository(&self) -> String {
        text(&self.repository, self.repository_len)
    }

    pub fn reference(&self) -> String {
        text(&self.reference, self.reference_len)
    }

    pub fn digest(&self) -> String {
        text(&self.digest, self.digest_len)
    }

    pub fn agent(&self) -> String {
        text(&self.agent, self.agent_len)
    }

    pub fn identity(&self) -> String {
        text(&self.identity, self.identity_len)
    }

    /// Bytes before the first text field: the numbers, lengths, flags and client.
    pub const FIXED_BYTES: usize = std::mem::offset_of!(Record, repository);

    /// The text fields in packed order, as (offset in `Record`, length): each up to its
    /// length, cut to its field (a damaged ring's lengths cannot reach past a record).
    fn fields(&self) -> [(usize, usize); 5] {
        let [_, rest @ ..] = self.used();
        rest
    }

    /// Bytes of this record packed: the fixed part and its fields (`reference` left out when
    /// it is the digest).
    fn packed_len(&self, reference_is_digest: bool) -> usize {
        let [repo, reference, digest, agent, identity] = self.fields();
        let reference = if reference_is_digest { 0 } else { reference.1 };
        Self::FIXED_BYTES + repo.1 + reference + digest.1 + agent.1 + identity.1
    }

    /// Where the record's contents are, as (offset, length) runs: the fixed part, then each
    /// text field up to its length.
    fn used(&self) -> [(usize, usize); 6] {
        use std::mem::offset_of;
        let f = |at: usize, len: u8, cap: usize| (at, usize::from(len).min(cap));
        [
            (0, Self::FIXED_BYTES),
            f(offset_of!(Record, repository), self.repository_len, 255),
            f(offset_of!(Record, reference), self.reference_len, 128),
            f(offset_of!(Record, digest), self.digest_len, 136),
            f(offset_of!(Record, agent), self.agent_len, 128),
            f(offset_of!(Record, identity), self.identity_len, 255),
        ]
    }

    /// Empties the text field at `at` (a reader's record for a ring without that field).
    fn clear_from(&mut self, at: usize) {
        if at == std::mem::offset_of!(Record, identity) {
            self.identity_len = 0;
            self.flags &= !Self::IDENTITY_TRUNCATED;
        }
    }

    fn as_bytes(&self) -> &[u8; RECORD_BYTES] {
        // SAFETY: Record is repr(C), RECORD_BYTES long (asserted), plain bytes and integers.
        unsafe { &*(self as *const Record).cast::<[u8; RECORD_BYTES]>() }
    }

    /// A record from bytes a ring held: any bytes make a record (lengths are cut to their
    /// fields when read), so a damaged ring cannot make a reader fail. Fewer bytes than a
    /// record (a ring of `RECORD_BYTES_V1` records) leave the fields after them empty.
    pub fn from_bytes(b: &[u8]) -> Record {
        let mut r = Record::empty();
        let n = b.len().min(RECORD_BYTES);
        // SAFETY: every bit pattern is a valid Record (integers and byte arrays), and at most
        // RECORD_BYTES, the destination's length, are copied.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut r as *mut Record).cast::<u8>(), n)
        };
        r
    }
}

enum Field {
    Repository,
    Reference,
    Digest,
    Agent,
}

fn field(bytes: &[u8], len: u8) -> &[u8] {
    &bytes[..(len as usize).min(bytes.len())]
}

fn text(bytes: &[u8], len: u8) -> String {
    String::from_utf8_lossy(field(bytes, len)).into_owned()
}

/// Allocates the whole of `f` (fallocate), so writes through a mapping never fault for space.
fn allocate(f: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file we opened for writing.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // A file system without fallocate: write the zeros after the header.
        let zeros = vec![0u8; 1 << 20];
        let mut left = len.saturating_sub(HEADER_BYTES as u64);
        let mut w = f;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            w.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        return Ok(());
    }
    Err(e)
}

/// A ring file mapped into memory; the writer and the reader share the code that finds things.
struct Mapped {
    map: *mut u8,
    len: usize,
    /// Bytes of records (packed), or records (slots).
    capacity: u64,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `LGHTEVT2`: packed records at byte positions.
    Packed,
    /// `LGHTEVT1`: fixed slots of this many bytes (`RECORD_BYTES`, or `RECORD_BYTES_V1` in an
    /// older ring), `head` and `tail` counting records.
    Slots(usize),
}

// SAFETY: the mapping is shared memory reached through atomics and plain copies; each side
// (one core, or the control plane's drain) uses its own `Mapped` from one thread at a time.
unsafe impl Send for Mapped {}

impl Mapped {
    fn map(file: &File, len: usize) -> io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        // SAFETY: a shared read-write mapping of a file of `len` bytes we opened; unmapped in
        // Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let m = Mapped {
            map: p.cast(),
            len,
            capacity: 0,
            kind: Kind::Packed,
        };
        Ok(m)
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= HEADER_BYTES);
        // SAFETY: offsets are 8-aligned inside the header page of a live, page-aligned mapping.
        unsafe { &*self.map.add(offset).cast::<AtomicU64>() }
    }

    /// Where the record at `seq` (a record's number in a ring of slots, a byte position in a
    /// packed one) starts; a packed record may run on into the slack after the capacity.
    fn at(&self, seq: u64) -> *mut u8 {
        let i = (seq % self.capacity) as usize;
        let offset = match self.kind {
            Kind::Packed => i,
            Kind::Slots(size) => i * size,
        };
        // SAFETY: i < capacity; the mapping holds HEADER_BYTES and capacity records of their
        // size (slots), or capacity bytes and PACKED_MAX_BYTES of slack (packed).
        unsafe { self.map.add(HEADER_BYTES + offset) }
    }

    /// Written and not yet taken, in the ring's units; all of them when the words are damaged
    /// (a writer never gets more than the capacity ahead).
    fn used(&self) -> (u64, u64, bool) {
        let tail = self.word(OFF_TAIL).load(Ordering::Relaxed);
        let head = self.word(OFF_HEAD).load(Ordering::Acquire);
        let n = head.wrapping_sub(tail);
        (tail, head, n <= self.capacity)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.map.cast(), self.len) };
    }
}

/// A core's end of its ring.
pub struct RingWriter {
    m: Mapped,
}

impl RingWriter {
    /// Makes a fresh ring with room for `records` of the largest records (`RECORD_BYTES` a
    /// record; packed, most take a fifth of that) at `path` (a new file renamed into place, so
    /// a reader of the previous one keeps its mapping). 0 records: the header alone, for the
    /// counters (every push is then dropped; a core with its log off makes none).
    pub fn create(path: &Path, records: u64, started_unix_us: u64) -> io::Result<RingWriter> {
        let capacity = records * RECORD_BYTES as u64;
        let len = match capacity {
            0 => HEADER_BYTES,
            _ => HEADER_BYTES + capacity as usize + PACKED_MAX_BYTES,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("ring.new");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut header = vec![0u8; HEADER_BYTES];
        header[..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[OFF_RECORD_BYTES..OFF_RECORD_BYTES + 8]
            .copy_from_slice(&(PACKED_ALIGN as u64).to_le_bytes());
        header[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
        header[OFF_STARTED..OFF_STARTED + 8].copy_from_slice(&started_unix_us.to_le_bytes());
        f.write_all(&header)?;
        // Every page allocated now: a page of a shared mapping first written on a full file
        // system would be a SIGBUS, not an error.
        allocate(&f, len as u64).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        std::fs::rename(&tmp, path)?;
        let mut m = Mapped::map(&f, len)?;
        m.capacity = capacity;
        Ok(RingWriter { m })
    }

    /// Appends a record, packed; false (and counted as dropped) when the ring has no room.
    pub fn push(&self, r: &Record) -> bool {
        let head = self.m.word(OFF_HEAD).load(Ordering::Relaxed);
        let tail = self.m.word(OFF_TAIL).load(Ordering::Acquire);
        let reference_is_digest = r.reference_len != 0 && r.reference_bytes() == r.digest_bytes();
        let room = r
            .packed_len(reference_is_digest)
            .next_multiple_of(PACKED_ALIGN) as u64;
        if head.wrapping_sub(tail) + room > self.m.capacity {
            self.count_dropped();
            return false;
        }
        // Only what the record holds, one field after the other: a few cache lines, not the
        // 1 KiB of the record (a copy the drain's core read last costs a line each).
        let src = r.as_bytes().as_ptr();
        let dst = self.m.at(head);
        // SAFETY: [head, head + room) is outside [tail, head), which the reader does not
        // touch, and inside the mapping (a record starting before the capacity's end runs at
        // most PACKED_MAX_BYTES, the slack, past it); `fields` stays inside a record.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, Record::FIXED_BYTES);
            // The ring's own flag, set from what was written (whatever the record's said).
            let flags = r.flags & !Record::REFERENCE_IS_DIGEST;
            *dst.add(std::mem::offset_of!(Record, flags)) = match reference_is_digest {
                true => flags | Record::REFERENCE_IS_DIGEST,
                false => flags,
            };
            let mut at = Record::FIXED_BYTES;
            for (i, (from, len)) in r.fields().into_iter().enumerate() {
                if i == 1 && reference_is_digest {
                    continue;
                }
                std::ptr::copy_nonoverlapping(src.add(from), dst.add(at), len);
                at += len;
            }
        }
        self.m.word(OFF_HEAD).store(head + room, Ordering::Release);
        true
    }

    /// The ring takes records: the event log is on (a ring of capacity 0 holds the core's
    /// counters alone).
    pub fn takes_records(&self) -> bool {
        self.m.capacity > 0
    }

    /// Room for a typical record now (a pull's takes three or four cache lines). A core finds
    /// out before it fills a record in: with the ring this full the record would be dropped at
    /// `push`, so under a load the drain cannot keep up with it is not made at all
    /// ([`RingWriter::count_dropped`] counts it instead).
    pub fn has_room(&self) -> bool {
        let head = self.m.word(OFF_HEAD).load(Ordering::Relaxed);
        let tail = self.m.word(OFF_TAIL).load(Ordering::Relaxed);
        head.wrapping_sub(tail) + ROOM_TYPICAL_BYTES <= self.m.capacity
    }

    /// Counts a record dropped without being offered (see [`RingWriter::has_room`]).
    pub fn count_dropped(&self) {
        let d = self.m.word(OFF_DROPPED);
        d.store(d.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Adds to a counter (the core is its only writer).
    pub fn add(&self, counter: usize, n: u64) {
        let w = self.m.word(OFF_COUNTERS + 8 * counter);
        w.store(w.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(&self, counter: usize, v: u64) {
        self.m
            .word(OFF_COUNTERS + 8 * counter)
            .store(v, Ordering::Relaxed);
    }

    /// Counts a request answered on the pull path: its route, status, bytes and latency.
    pub fn count(&self, route: usize, status: u16, bytes: u64, latency_us: Option<u64>) {
        let class = match status {
            300..=399 => 1,
            400..=499 => 2,
            500.. => 3,
            _ => 0,
        };
        self.add(counter::REQUESTS + route.min(4) * 4 + class, 1);
        self.add(counter::BYTES_SENT, bytes);
        if let Some(us) = latency_us {
            let bucket = LATENCY_BOUNDS_US
                .iter()
                .position(|&b| us <= b)
                .unwrap_or(LATENCY_BOUNDS_US.len());
            self.add(counter::LATENCY + bucket, 1);
            self.add(counter::LATENCY_SUM_US, us);
        }
    }
}

/// The control plane's end of a ring.
pub struct RingReader {
    m: Mapped,
    /// The file's identity when it was mapped (a new data plane renames a new ring over it).
    pub inode: u64,
}

impl RingReader {
    /// Maps the ring at `path`; an error if it is not a whole ring.
    pub fn open(path: &Path) -> io::Result<RingReader> {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let meta = f.metadata()?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        if (meta.len() as usize) < HEADER_BYTES {
            return Err(bad("event ring shorter than its header"));
        }
        let mut m = Mapped::map(&f, meta.len() as usize)?;
        let size = m.word(OFF_RECORD_BYTES).load(Ordering::Relaxed);
        let kind = match m.word(0).load(Ordering::Relaxed) {
            MAGIC if size == PACKED_ALIGN as u64 => Kind::Packed,
            MAGIC_SLOTS if size == RECORD_BYTES as u64 => Kind::Slots(RECORD_BYTES),
            MAGIC_SLOTS if size == RECORD_BYTES_V1 as u64 => Kind::Slots(RECORD_BYTES_V1),
            MAGIC | MAGIC_SLOTS => return Err(bad("event ring of another record size")),
            _ => return Err(bad("not an event ring")),
        };
        let capacity = m.word(OFF_CAPACITY).load(Ordering::Relaxed);
        let body = match kind {
            // Counters only (the writer's log is off).
            Kind::Packed if capacity == 0 => Some(0),
            Kind::Packed if capacity.is_multiple_of(PACKED_ALIGN as u64) => {
                capacity.checked_add(PACKED_MAX_BYTES as u64)
            }
            Kind::Packed => None,
            Kind::Slots(_) if capacity == 0 => None,
            Kind::Slots(size) => capacity.checked_mul(size as u64),
        };
        if body.and_then(|b| b.checked_add(HEADER_BYTES as u64)) != Some(meta.len()) {
            return Err(bad("event ring of the wrong length"));
        }
        m.capacity = capacity;
        m.kind = kind;
        Ok(RingReader {
            m,
            inode: meta.ino(),
        })
    }

    /// When the writer made the ring (unix µs).
    pub fn started_unix_us(&self) -> u64 {
        self.m.word(OFF_STARTED).load(Ordering::Relaxed)
    }

    /// Takes up to `max` records into `out`; how many.
    pub fn drain(&self, out: &mut Vec<Record>, max: usize) -> usize {
        self.drain_each(max, u64::MAX, |r| out.push(*r))
    }

    /// Nothing written is left to take.
    pub fn is_empty(&self) -> bool {
        let (tail, head, _) = self.m.used();
        tail == head
    }

    /// At least half the ring holds records not yet taken: the writer may soon drop some.
    pub fn half_full(&self) -> bool {
        let (tail, head, _) = self.m.used();
        self.m.capacity > 0 && head.wrapping_sub(tail).min(self.m.capacity) * 2 >= self.m.capacity
    }

    /// The ring takes records (it is not the counters alone of a core whose log is off).
    pub fn takes_records(&self) -> bool {
        self.m.capacity > 0
    }

    /// Takes up to `max` records, handing each to `each` in ring order; how many. Stops before
    /// the first record timed at or after `before_unix_us`: it stays in the ring (so a reader
    /// that must hold recent records back takes them later from here, and a crash meanwhile
    /// loses none). Each is copied once, into one record on the stack, whatever the count: the
    /// drain formats them from there and keeps nothing of this size.
    pub fn drain_each(
        &self,
        max: usize,
        before_unix_us: u64,
        mut each: impl FnMut(&Record),
    ) -> usize {
        let (tail, head, whole) = self.m.used();
        if !whole {
            // The words are damaged: skip to the writer.
            self.m.word(OFF_TAIL).store(head, Ordering::Release);
            return 0;
        }
        // One record, reused: bytes past a field's length (left from an earlier record) are
        // never read, lengths being cut to their fields.
        let mut r = Record::empty();
        let dst = (&mut r as *mut Record).cast::<u8>();
        let mut taken = 0;
        let mut at = tail;
        while at != head && taken < max {
            if self.m.kind == Kind::Packed && head.wrapping_sub(at) < Record::FIXED_BYTES as u64 {
                // A damaged record runs past the writer: stop at the writer.
                at = head;
                break;
            }
            let src = self.m.at(at);
            // SAFETY: the record at `at` is inside [tail, head), which the writer does not
            // touch until tail moves past it; the fixed part is inside any record; every bit
            // pattern is a valid Record (integers and byte arrays).
            unsafe { std::ptr::copy_nonoverlapping(src, dst, Record::FIXED_BYTES) };
            if r.time_unix_us >= before_unix_us {
                break;
            }
            let next = match self.m.kind {
                Kind::Packed => {
                    let packed = r.flags & Record::REFERENCE_IS_DIGEST != 0;
                    r.flags &= !Record::REFERENCE_IS_DIGEST;
                    let room = r.packed_len(packed).next_multiple_of(PACKED_ALIGN) as u64;
                    if room > head.wrapping_sub(at) {
                        // A damaged record runs past the writer: stop at the writer.
                        at = head;
                        break;
                    }
                    let mut from = Record::FIXED_BYTES;
                    for (i, (to, len)) in r.fields().into_iter().enumerate() {
                        if i == 1 && packed {
                            continue;
                        }
                        // SAFETY: as above; `from + len` is at most PACKED_MAX_BYTES, which
                        // the slack after the capacity holds, and `to + len` is inside a
                        // Record (`fields` cuts lengths to their fields).
                        unsafe { std::ptr::copy_nonoverlapping(src.add(from), dst.add(to), len) };
                        from += len;
                    }
                    if packed {
                        let n = usize::from(r.digest_len).min(r.reference.len());
                        r.reference[..n].copy_from_slice(&r.digest[..n]);
                        r.reference_len = n as u8;
                    }
                    at.wrapping_add(room)
                }
                Kind::Slots(size) => {
                    for (to, len) in r.fields() {
                        match to + len <= size {
                            // SAFETY: as above, and inside the slot's `size` bytes.
                            true => unsafe {
                                std::ptr::copy_nonoverlapping(src.add(to), dst.add(to), len)
                            },
                            // A field the ring's records do not have (identity, in
                            // RECORD_BYTES_V1).
                            false => r.clear_from(to),
                        }
                    }
                    at.wrapping_add(1)
                }
            };
            taken += 1;
            at = next;
            each(&r);
        }
        self.m.word(OFF_TAIL).store(at, Ordering::Release);
        taken
    }

    /// Records the writer dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.m.word(OFF_DROPPED).load(Ordering::Relaxed)
    }

    /// The writer's counters.
    pub fn counters(&self) -> [u64; COUNTERS] {
        std::array::from_fn(|i| self.m.word(OFF_COUNTERS + 8 * i).load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record's text fields, in packed order.
    fn texts(r: &Record) -> [String; 5] {
        [
            r.repository(),
            r.reference(),
            r.digest(),
            r.agent(),
            r.identity(),
        ]
    }

    fn record(i: u64) -> Record {
        let mut r = Record::empty();
        r.start(Action::BlobGet, "library/nginx", &["sha256", ":", "abc"]);
        r.set_digest(&["sha256:", &format!("{i:064x}")]);
        r.set_client(Some("198.18.0.7".parse().unwrap()));
        r.set_agent(b"containerd/1.6");
        r.set_identity(b"system:node:worker-1");
        r.status = 200;
        r.bytes_sent = i;
        r
    }

    #[test]
    fn records_too_recent_stay_in_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/events/core-0.ring");
        let w = RingWriter::create(&path, 8, 0).unwrap();
        let r = RingReader::open(&path).unwrap();
        for t in [10, 20, 30, 40] {
            let mut rec = record(t);
            rec.time_unix_us = t;
            assert!(w.push(&rec));
        }
        let mut got = Vec::new();
        assert_eq!(r.drain_each(8, 25, |rec| got.push(rec.time_unix_us)), 2);
        assert!(!r.is_empty(), "30 and 40 wait in the ring");
        // A reader opened anew (the next start, after a crash) still finds them.
        let again = RingReader::open(&path).unwrap();
        assert_eq!(
            again.drain_each(8, u64::MAX, |rec| got.push(rec.time_unix_us)),
            2
        );
        assert_eq!(got, [10, 20, 30, 40]);
        assert!(r.is_empty());
    }

    #[test]
    fn records_go_through_in_order_and_a_full_ring_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/events/core-0.ring");
        // Room for one record of the largest kind: 1 KiB, five of these (192 bytes packed).
        let w = RingWriter::create(&path, 1, 42).unwrap();
        let r = RingReader::open(&path).unwrap();
        assert_eq!(r.started_unix_us(), 42);
        for i in 0..7 {
            assert_eq!(w.push(&record(i)), i < 5, "record {i}");
        }
        assert_eq!(r.dropped(), 2);
        assert!(r.half_full());
        let mut out = Vec::new();
        assert_eq!(r.drain(&mut out, 3), 3);
        assert_eq!(r.drain(&mut out, 10), 2);
        assert!(r.is_empty() && !r.half_full());
        assert_eq!(
            out.iter().map(|r| r.bytes_sent).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let first = &out[0];
        assert_eq!(first.action(), Some(Action::BlobGet));
        assert_eq!(first.repository(), "library/nginx");
        assert_eq!(first.reference(), "sha256:abc");
        assert_eq!(first.digest(), format!("sha256:{:064x}", 0));
        assert_eq!(first.client(), Some("198.18.0.7".parse().unwrap()));
        assert_eq!(first.agent(), "containerd/1.6");
        assert_eq!(first.identity(), "system:node:worker-1");
        // Room again: the writer goes on past the end (the fifth record ended at 960 of
        // 1024 bytes, so the next one runs into the slack) and around.
        for i in 10..15 {
            assert!(w.push(&record(i)), "record {i}");
        }
        out.clear();
        assert_eq!(r.drain(&mut out, 10), 5);
        assert_eq!(
            out.iter().map(|r| r.bytes_sent).collect::<Vec<_>>(),
            [10, 11, 12, 13, 14]
        );
        assert!(out.iter().all(|r| r.identity() == "system:node:worker-1"));
    }

    #[test]
    fn packed_records_of_every_length_come_back_whole_through_many_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        let w = RingWriter::create(&path, 3, 0).unwrap();
        let r = RingReader::open(&path).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        let text = |c: char, n: usize| c.to_string().repeat(n);
        let fields = |r: &Record| (texts(r), r.flags, r.bytes_sent);
        let (mut sent, mut got) = (Vec::new(), Vec::new());
        let mut dropped = 0;
        for i in 0..2_000u64 {
            let mut rec = Record::empty();
            rec.set_identity(text('i', next(300)).as_bytes());
            let digest = format!("sha256:{i:064x}");
            // Half by digest (the reference is the digest, written once), half by tag.
            let reference = match next(2) {
                0 => digest.clone(),
                _ => text('t', next(140)),
            };
            rec.start(Action::ManifestGet, &text('r', next(300)), &[&reference]);
            rec.set_digest(&[&digest[..next(digest.len() + 1)]]);
            rec.set_agent(text('a', next(140)).as_bytes());
            rec.bytes_sent = i;
            let want = fields(&rec);
            // A record that says (wrongly) its reference is its digest is written as it is:
            // the ring's flag follows what was written, and a reader never sees it.
            if next(8) == 0 {
                rec.flags |= Record::REFERENCE_IS_DIGEST;
            }
            match w.push(&rec) {
                true => sent.push(want),
                false => dropped += 1,
            }
            if next(4) == 0 {
                r.drain_each(next(5) + 1, u64::MAX, |rec| got.push(fields(rec)));
            }
        }
        r.drain_each(usize::MAX, u64::MAX, |rec| got.push(fields(rec)));
        assert!(dropped > 0 && sent.len() > 1_000, "{dropped} dropped");
        assert_eq!(r.dropped(), dropped);
        assert_eq!(got.len(), sent.len());
        for (g, s) in got.iter().zip(&sent) {
            assert_eq!(g, s);
        }
    }

    #[test]
    fn rings_of_fixed_slots_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        // Rings as data planes of earlier versions wrote them: slots of 1 KiB, and before
        // identities, of 768 bytes; the same fields at the same offsets.
        for size in [RECORD_BYTES, RECORD_BYTES_V1] {
            let capacity = 2u64;
            let mut file = vec![0u8; HEADER_BYTES + capacity as usize * size];
            file[..8].copy_from_slice(&MAGIC_SLOTS.to_le_bytes());
            file[OFF_RECORD_BYTES..OFF_RECORD_BYTES + 8]
                .copy_from_slice(&(size as u64).to_le_bytes());
            file[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
            file[OFF_HEAD..OFF_HEAD + 8].copy_from_slice(&2u64.to_le_bytes());
            for i in 0..2u64 {
                let mut r = record(i);
                if size == RECORD_BYTES_V1 {
                    r.identity_len = 0;
                }
                let at = HEADER_BYTES + i as usize * size;
                file[at..at + size].copy_from_slice(&r.as_bytes()[..size]);
            }
            std::fs::write(&path, &file).unwrap();
            let reader = RingReader::open(&path).unwrap();
            let mut out = Vec::new();
            assert_eq!(reader.drain(&mut out, 10), 2);
            assert_eq!(out[1].bytes_sent, 1);
            assert_eq!(out[1].repository(), "library/nginx");
            assert_eq!(out[1].agent(), "containerd/1.6");
            let identity = if size == RECORD_BYTES {
                "system:node:worker-1"
            } else {
                ""
            };
            assert_eq!(out[1].identity(), identity);
            assert!(reader.is_empty());
            // Any other record size is refused.
            file[OFF_RECORD_BYTES..OFF_RECORD_BYTES + 8].copy_from_slice(&512u64.to_le_bytes());
            std::fs::write(&path, &file).unwrap();
            assert!(RingReader::open(&path).is_err());
        }
    }

    #[test]
    fn only_what_a_record_holds_is_copied_and_a_short_record_after_a_long_one_reads_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        let w = RingWriter::create(&path, 4, 0).unwrap();
        let mut long = Record::empty();
        long.start(
            Action::ManifestGet,
            &"r".repeat(200),
            &["t".repeat(100).as_str()],
        );
        long.set_digest(&["sha256:", &"a".repeat(64)]);
        long.set_agent(&[b'x'; 120]);
        long.set_identity(&[b'i'; 200]);
        let mut short = Record::empty();
        short.start(Action::BlobGet, "ab", &["v"]);
        short.set_identity(b"me");
        short.status = 206;
        for r in [&long, &short, &long, &short] {
            assert!(w.push(r));
        }
        let reader = RingReader::open(&path).unwrap();
        let fields = |r: &Record| (texts(r), r.status, r.action());
        let mut got = Vec::new();
        reader.drain_each(4, u64::MAX, |r| got.push(fields(r)));
        let want = fields;
        assert_eq!(
            got,
            vec![want(&long), want(&short), want(&long), want(&short)]
        );
    }

    #[test]
    fn long_fields_are_cut_and_flagged() {
        let mut r = Record::empty();
        let long = "a/".repeat(200);
        r.start(Action::ManifestGet, &long, &["v1"]);
        assert_eq!(r.repository().len(), 255);
        assert_eq!(r.flags & Record::TRUNCATED, Record::TRUNCATED);
        assert_eq!(r.reference(), "v1");
        // An identity, set before `start`, stays cut and flagged through it.
        let mut r = Record::empty();
        r.set_identity("x".repeat(300).as_bytes());
        r.start(Action::BlobGet, "a", &["b"]);
        assert_eq!(r.identity().len(), 255);
        assert_eq!(r.flags, Record::IDENTITY_TRUNCATED);
        r.set_identity(b"alice");
        assert_eq!((r.identity().as_str(), r.flags), ("alice", 0));
    }

    #[test]
    fn counters_and_the_latency_histogram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-1.ring");
        let w = RingWriter::create(&path, 8, 0).unwrap();
        w.count(2, 200, 1000, Some(90));
        w.count(2, 404, 200, Some(3_000));
        w.count(1, 206, 10, Some(20_000_000));
        w.set(counter::OPEN, 5);
        let c = RingReader::open(&path).unwrap().counters();
        assert_eq!(c[counter::REQUESTS + 2 * 4], 1);
        assert_eq!(c[counter::REQUESTS + 2 * 4 + 2], 1);
        assert_eq!(c[counter::REQUESTS + 4], 1);
        assert_eq!(c[counter::BYTES_SENT], 1210);
        assert_eq!(c[counter::LATENCY], 1);
        assert_eq!(c[counter::LATENCY + 5], 1);
        assert_eq!(c[counter::LATENCY + 16], 1);
        assert_eq!(c[counter::LATENCY_SUM_US], 20_003_090);
        assert_eq!(c[counter::OPEN], 5);
    }

    /// A ring too full for a typical record says so before one is filled in; a record shed
    /// then counts as dropped, as one `push` refuses; draining makes room again.
    #[test]
    fn a_ring_without_room_for_a_typical_record_says_so_and_sheds_count_as_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        let w = RingWriter::create(&path, 1, 0).unwrap();
        let reader = RingReader::open(&path).unwrap();
        let mut pushed = 0;
        while w.has_room() {
            assert!(w.push(&record(pushed)), "room said, room found");
            pushed += 1;
            assert!(pushed < 64, "a 1 KiB ring fills");
        }
        assert!(pushed >= 1);
        w.count_dropped();
        assert_eq!(reader.dropped(), 1);
        assert_eq!(reader.drain(&mut Vec::new(), 100), pushed as usize);
        assert!(w.has_room(), "drained");
        assert!(!RingWriter::create(&dir.path().join("core-1.ring"), 0, 0)
            .unwrap()
            .has_room());
    }

    /// The log off: the header alone, counters kept, no record taken nor offered.
    #[test]
    fn a_ring_of_no_records_holds_the_counters_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        let w = RingWriter::create(&path, 0, 7).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_BYTES as u64);
        assert!(!w.takes_records());
        w.count(2, 200, 1000, Some(90));
        assert!(!w.push(&record(1)), "no room for any record");
        let r = RingReader::open(&path).unwrap();
        assert!(!r.takes_records());
        assert!(r.is_empty());
        assert!(!r.half_full());
        assert_eq!(r.drain(&mut Vec::new(), 10), 0);
        assert_eq!(r.counters()[counter::BYTES_SENT], 1000);
        assert_eq!(r.dropped(), 1);
        assert_eq!(r.started_unix_us(), 7);
        assert!(RingReader::open(dir.path().join("core-1.ring").as_path()).is_err());
        let with_records = RingWriter::create(&path, 1, 0).unwrap();
        assert!(with_records.takes_records());
        assert!(with_records.push(&record(1)));
        assert!(RingReader::open(&path).unwrap().takes_records());
    }

    #[test]
    fn a_new_ring_replaces_the_file_and_the_old_reader_keeps_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        let w = RingWriter::create(&path, 4, 1).unwrap();
        w.push(&record(7));
        let old = RingReader::open(&path).unwrap();
        drop(w);
        let w2 = RingWriter::create(&path, 4, 2).unwrap();
        w2.push(&record(8));
        let new = RingReader::open(&path).unwrap();
        assert_ne!(old.inode, new.inode);
        let mut out = Vec::new();
        old.drain(&mut out, 10);
        new.drain(&mut out, 10);
        assert_eq!(out.iter().map(|r| r.bytes_sent).collect::<Vec<_>>(), [7, 8]);
    }

    #[test]
    fn damaged_rings_are_refused_or_read_without_harm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ring");
        std::fs::write(&path, b"short").unwrap();
        assert!(RingReader::open(&path).is_err());
        let w = RingWriter::create(&path, 4, 0).unwrap();
        // A head far ahead is skipped.
        w.m.word(OFF_HEAD).store(100_000, Ordering::Relaxed);
        let r = RingReader::open(&path).unwrap();
        let mut out = Vec::new();
        assert_eq!(r.drain(&mut out, 10), 0);
        assert!(r.is_empty());
        // Garbage (every byte 0xff: lengths of 255, the flag saying the reference is the
        // digest) but for the times: the first record is read whole, its lengths cut to the
        // fields (832 bytes); the second would run past the head, so the reader stops there.
        let garbage = [0xffu8; 4096];
        // SAFETY: the ring's records, which no one else touches in this test; times below
        // u64::MAX so that no record is held back as too recent.
        unsafe {
            std::ptr::copy_nonoverlapping(garbage.as_ptr(), w.m.at(0), garbage.len());
            *w.m.at(0).cast::<u64>() = 1;
            *w.m.at(832).cast::<u64>() = 1;
        }
        w.m.word(OFF_TAIL).store(0, Ordering::Relaxed);
        w.m.word(OFF_HEAD).store(1_000, Ordering::Relaxed);
        let mut lens = Vec::new();
        r.drain_each(10, u64::MAX, |rec| lens.push(rec.repository_bytes().len()));
        assert_eq!(lens, [255], "one whole record, then the head");
        assert!(r.is_empty());
        // A head inside a record's fixed part: nothing is read from past it.
        w.m.word(OFF_TAIL).store(0, Ordering::Relaxed);
        w.m.word(OFF_HEAD).store(8, Ordering::Relaxed);
        assert_eq!(r.drain(&mut out, 10), 0);
        assert!(r.is_empty());
        let mut garbage = [0xffu8; RECORD_BYTES];
        garbage[0] = 1;
        let g = Record::from_bytes(&garbage);
        assert_eq!(g.repository().chars().count(), 255);
        assert_eq!(g.action(), None);
    }
}
