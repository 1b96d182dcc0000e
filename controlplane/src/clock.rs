//! The wall clock as the control plane writes it down: unix milliseconds and microseconds
//! (0 for a clock before 1970, which nothing here can mean).

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in unix milliseconds.
pub fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    ms_of(SystemTime::now())
}

/// Now, in unix microseconds.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
