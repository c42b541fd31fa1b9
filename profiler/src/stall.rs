//! Stall assembly: a kernel stall event -> the stall the outputs report.
use std::time::{Duration, SystemTime};

use profiler_common::StallEvent;
use serde::Serialize;

use crate::clock::{WallClock, serialize_rfc3339};

/// One event-loop iteration at or above the threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stall {
    /// When the iteration began (the poll before it returned).
    #[serde(rename = "time", serialize_with = "serialize_rfc3339")]
    pub start: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub duration_us: u64,
    pub threshold_us: u64,
}

impl Stall {
    pub fn from_event(event: &StallEvent, pid: u32, threshold: Duration, clock: &WallClock) -> Self {
        Self {
            start: clock.at(event.start_ns),
            pid,
            tid: event.tid,
            duration_us: event.end_ns.saturating_sub(event.start_ns) / 1_000,
            threshold_us: threshold.as_micros() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::EVENT_KIND_STALL;

    #[test]
    fn duration_is_the_time_between_poll_return_and_next_poll() {
        let clock = WallClock::new();
        let event = StallEvent { kind: EVENT_KIND_STALL, tid: 42, start_ns: 1_000_000_000, end_ns: 1_250_400_999 };
        let stall = Stall::from_event(&event, 42, Duration::from_millis(10), &clock);
        assert_eq!(stall.duration_us, 250_400);
        assert_eq!(stall.threshold_us, 10_000);
        assert_eq!(stall.start, clock.at(1_000_000_000));
    }
}
