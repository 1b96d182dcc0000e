//! A short ASCII string stored inline (no heap), so that parsing a request's names, tags and
//! digests allocates nothing on the data plane's hot path.

use std::fmt;
use std::hash::{Hash, Hasher};

/// At most `N` ASCII bytes, inline.
#[derive(Clone, Copy)]
pub struct InlineStr<const N: usize> {
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> InlineStr<N> {
    /// None if `s` is longer than `N` or not ASCII.
    pub fn new(s: &str) -> Option<Self> {
        if s.len() > N || !s.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; N];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Some(InlineStr {
            len: s.len() as u16,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        let b = &self.bytes[..self.len as usize];
        debug_assert!(b.is_ascii());
        // SAFETY: constructed only from ASCII `&str`s, and ASCII is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(b) }
    }
}

impl<const N: usize> PartialEq for InlineStr<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl<const N: usize> Eq for InlineStr<N> {}

impl<const N: usize> PartialOrd for InlineStr<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Ord for InlineStr<N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl<const N: usize> Hash for InlineStr<N> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl<const N: usize> fmt::Debug for InlineStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> fmt::Display for InlineStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::ops::Deref for InlineStr<N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}
