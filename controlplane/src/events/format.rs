//! The log's lines, written by hand: the drain formats tens of thousands a second on a core
//! the data plane and its clients need, so nothing here allocates or goes through
//! `core::fmt` for the common case (ASCII text, integers, IPv4 addresses).

use std::net::IpAddr;

use lighter_layout::events::Record;

use super::Event;

/// Where the text a usage summary needs sits in a line just written (offsets from the line's
/// start), so the drain hands it over without reading the line back.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Spans {
    pub repository: Span,
    pub reference: Span,
    pub digest: Span,
    pub client: Span,
    /// Each field's text is the line's bytes (no escape was needed): spans point into the line.
    pub verbatim: bool,
}

/// A run of bytes: offset and length.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Span {
    pub start: u32,
    pub len: u32,
}

/// One record as a line of the log, appended to `out`; where its fields' text is.
pub(super) fn line(out: &mut Vec<u8>, r: &Record, core: Option<u64>) -> Spans {
    let base = out.len();
    let mut spans = Spans {
        verbatim: true,
        ..Spans::default()
    };
    out.extend_from_slice(b"{\"time\":\"");
    write_rfc3339(out, r.time_unix_us);
    out.extend_from_slice(b"\",\"time_unix_us\":");
    write_u64(out, r.time_unix_us);
    out.extend_from_slice(b",\"source\":\"dataplane\",\"action\":\"");
    out.extend_from_slice(r.action().map_or("unknown", |a| a.name()).as_bytes());
    out.extend_from_slice(b"\",\"repository\":");
    spans.verbatim &= json_string_at(out, base, r.repository_bytes(), &mut spans.repository);
    out.extend_from_slice(b",\"reference\":");
    spans.verbatim &= json_string_at(out, base, r.reference_bytes(), &mut spans.reference);
    out.extend_from_slice(b",\"status\":");
    write_u64(out, u64::from(r.status));
    out.extend_from_slice(b",\"bytes\":");
    write_u64(out, r.bytes_sent);
    out.extend_from_slice(b",\"duration_us\":");
    write_u64(out, r.duration_us);
    if r.digest_len > 0 {
        out.extend_from_slice(b",\"digest\":");
        spans.verbatim &= json_string_at(out, base, r.digest_bytes(), &mut spans.digest);
    }
    if let Some(c) = r.client() {
        out.extend_from_slice(b",\"client\":\"");
        let start = out.len();
        write_ip(out, c);
        spans.client = span(base, start, out.len());
        out.push(b'"');
    }
    if r.agent_len > 0 {
        out.extend_from_slice(b",\"user_agent\":");
        json_string(out, r.agent_bytes());
    }
    if r.identity_len > 0 {
        out.extend_from_slice(b",\"identity\":");
        json_string(out, r.identity_bytes());
    }
    if let Some(c) = core {
        out.extend_from_slice(b",\"core\":");
        write_u64(out, c);
    }
    if r.flags & (Record::TRUNCATED | Record::IDENTITY_TRUNCATED) != 0 {
        out.extend_from_slice(b",\"truncated\":true");
    }
    out.extend_from_slice(b"}\n");
    spans
}

/// One of the control plane's events as a line of the log: the same leading fields as a
/// record's (`time`, `time_unix_us`, `source`, `action`), then its own.
pub(super) fn event_line(out: &mut Vec<u8>, e: &Event) {
    out.extend_from_slice(b"{\"time\":\"");
    write_rfc3339(out, e.time_unix_us);
    out.extend_from_slice(b"\",\"time_unix_us\":");
    write_u64(out, e.time_unix_us);
    out.extend_from_slice(b",\"source\":\"controlplane\",\"action\":\"");
    out.extend_from_slice(e.action.as_bytes());
    out.push(b'"');
    for (k, v) in &e.fields {
        out.push(b',');
        serde_json::to_writer(&mut *out, k).expect("JSON of a string");
        out.push(b':');
        serde_json::to_writer(&mut *out, v).expect("JSON of a value");
    }
    out.extend_from_slice(b"}\n");
}

fn span(base: usize, start: usize, end: usize) -> Span {
    Span {
        start: (start - base) as u32,
        len: (end - start) as u32,
    }
}

/// `bytes` as a JSON string, with where its text sits (from `base`); whether it is verbatim.
fn json_string_at(out: &mut Vec<u8>, base: usize, bytes: &[u8], at: &mut Span) -> bool {
    let start = out.len() + 1;
    let verbatim = json_string(out, bytes);
    *at = span(base, start, out.len() - 1);
    verbatim
}

/// `bytes` as a JSON string (bytes that are not UTF-8 become U+FFFD); whether they went in as
/// they are (printable ASCII with nothing to escape: names, references, digests, most agents).
pub(super) fn json_string(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    out.push(b'"');
    // Every byte looked at, with no early exit: the compiler makes it a vector loop.
    let plain = bytes.iter().fold(true, |ok, &b| {
        ok & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return true;
    }
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                c if (c as u32) < 0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    let n = c as usize;
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[n >> 4]);
                    out.push(HEX[n & 15]);
                }
                c => {
                    let mut b = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
    false
}

/// `n` in decimal.
pub(super) fn write_u64(out: &mut Vec<u8>, n: u64) {
    write_padded(out, n, 1);
}

/// `n` in decimal, zero-padded to `width` digits (at most 20; wider numbers are written
/// whole). The digits go straight into `out`'s spare room: no copy through a buffer.
fn write_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let digits = n
        .checked_ilog10()
        .map_or(1, |l| l as usize + 1)
        .max(width.min(20));
    out.reserve(digits);
    let len = out.len();
    let room = &mut out.spare_capacity_mut()[..digits];
    let mut m = n;
    for d in room.iter_mut().rev() {
        d.write(b'0' + (m % 10) as u8);
        m /= 10;
    }
    // SAFETY: the `digits` bytes after `len` were written just above, within the capacity
    // `reserve` made.
    unsafe { out.set_len(len + digits) };
}

/// An address as `IpAddr`'s `Display` writes it (IPv4 by hand; IPv6, rarer, through it).
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_u64(out, u64::from(o));
            }
        }
        IpAddr::V6(a) => {
            use std::io::Write as _;
            let _ = write!(out, "{a}");
        }
    }
}

/// `2026-11-29T23:30:00.123456Z` from unix µs (UTC, proleptic Gregorian).
pub fn rfc3339(unix_us: u64) -> String {
    let mut out = Vec::with_capacity(27);
    write_rfc3339(&mut out, unix_us);
    String::from_utf8(out).expect("ASCII")
}

pub(super) fn write_rfc3339(out: &mut Vec<u8>, unix_us: u64) {
    use std::cell::Cell;
    // Lines come in time order, many a second: the date and time of the last second written
    // are kept, and only the microseconds are formatted again.
    thread_local! {
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let secs = unix_us / 1_000_000;
    let (last, text) = SECOND.get();
    if last == secs {
        out.extend_from_slice(&text);
    } else {
        let start = out.len();
        write_date_time(out, secs);
        if let Ok(text) = out[start..].try_into() {
            SECOND.set((secs, text));
        }
    }
    write_padded(out, unix_us % 1_000_000, 6);
    out.push(b'Z');
}

/// `2026-11-29T23:30:00.` from unix seconds.
fn write_date_time(out: &mut Vec<u8>, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    write_padded(out, y.max(0) as u64, 4);
    out.push(b'-');
    write_padded(out, m as u64, 2);
    out.push(b'-');
    write_padded(out, d as u64, 2);
    out.push(b'T');
    write_padded(out, rem / 3600, 2);
    out.push(b':');
    write_padded(out, rem % 3600 / 60, 2);
    out.push(b':');
    write_padded(out, rem % 60, 2);
    out.push(b'.');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_addresses_read_as_the_standard_library_writes_them() {
        for n in [0, 7, 10, 99, 100, 65_535, 1_796_081_400_123_456, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            out.clear();
            write_padded(&mut out, n, 6);
            assert_eq!(out, format!("{n:06}").as_bytes());
        }
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "255.255.255.255",
            "198.18.3.40",
            "::1",
            "fe80::1:2",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn times_read_as_rfc3339_across_seconds_and_days() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (1_796_081_400_123_456, "2026-11-30T23:30:00.123456Z"),
            (1_796_081_400_999_999, "2026-11-30T23:30:00.999999Z"),
            (1_796_081_401_000_000, "2026-11-30T23:30:01.000000Z"),
            (1_796_081_400_000_001, "2026-11-30T23:30:00.000001Z"),
            (1_796_083_199_999_999, "2026-11-30T23:59:59.999999Z"),
            (1_796_083_200_000_000, "2026-12-01T00:00:00.000000Z"),
            (951_782_400_000_000, "2000-02-29T00:00:00.000000Z"),
            (253_402_300_799_999_999, "9999-12-31T23:59:59.999999Z"),
        ];
        // Twice: the second time from the kept second where it applies.
        for _ in 0..2 {
            for (us, want) in cases {
                assert_eq!(rfc3339(us), want);
            }
        }
    }

    #[test]
    fn strings_escape_only_what_json_needs_and_say_when_they_were_verbatim() {
        for (input, json, verbatim) in [
            (&b"team/app"[..], "\"team/app\"", true),
            (b"a\"b\\c", "\"a\\\"b\\\\c\"", false),
            (b"tab\there", "\"tab\\u0009here\"", false),
            (b"caf\xc3\xa9", "\"caf\u{e9}\"", false),
            (b"bad\xff", "\"bad\u{fffd}\"", false),
            (b"", "\"\"", true),
        ] {
            let mut out = Vec::new();
            assert_eq!(json_string(&mut out, input), verbatim);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), json);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, String::from_utf8_lossy(input));
        }
    }
}
