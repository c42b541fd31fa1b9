//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) -> wall-clock time for the outputs.
use std::time::{Duration, SystemTime};

/// Converts monotonic nanoseconds to wall-clock time with an offset measured once at start.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// Wall-clock time at monotonic zero.
    epoch: SystemTime,
}

impl WallClock {
    pub fn new() -> Self {
        let monotonic = Duration::from_nanos(monotonic_now_ns());
        Self {
            epoch: SystemTime::now() - monotonic,
        }
    }

    /// Wall-clock time of a kernel timestamp.
    pub fn at(&self, monotonic_ns: u64) -> SystemTime {
        self.epoch + Duration::from_nanos(monotonic_ns)
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-23T19:40:01.123456Z`.
pub fn rfc3339_micros(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// serde for a time as [`rfc3339_micros`] (`#[serde(with = "crate::clock::rfc3339")]`).
pub mod rfc3339 {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(
        time: &SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::rfc3339_micros(*time))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_timestamp_of_now_is_now() {
        let clock = WallClock::new();
        let difference = clock
            .at(monotonic_now_ns())
            .duration_since(SystemTime::now());
        let difference = difference.unwrap_or_else(|error| error.duration());
        assert!(difference < Duration::from_millis(50), "{difference:?}");
    }

    #[test]
    fn times_print_with_microseconds() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_micros(1_500_000_000_123_456);
        assert_eq!(rfc3339_micros(time), "2017-07-14T02:40:00.123456Z");
    }
}
