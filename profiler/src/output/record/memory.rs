//! The `memory` record: the target's resident-memory growth in one interval (or, in the
//! summary, the whole run) by what made it, from sampled page faults.
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Instance;
use crate::{clock::rfc3339, stack::Frame};

/// Memory growth over an interval, by origin and mechanism.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryGrowth {
    /// The target's resident memory (`VmRSS`) at the end.
    pub resident_bytes: u64,
    /// How much it changed over the interval.
    pub resident_change_bytes: i64,
    /// Pages the target's threads faulted in (page faults on pages not present, counted by
    /// the kernel), in bytes.
    pub new_page_bytes: u64,
    /// Pages copied on write (a write to a page shared with a forked child): the host's
    /// memory grows, not the target's resident size.
    pub copied_bytes: u64,
    /// Resident memory given back to the kernel (new pages minus the resident change):
    /// `madvise`, `munmap`, or reclaimed.
    pub given_back_bytes: u64,
    /// Bytes the target's threads advised away with `madvise` (`MADV_DONTNEED`, `MADV_FREE`,
    /// `MADV_REMOVE`) meanwhile (asked for, not all of it resident).
    pub madvised_bytes: u64,
    /// Page-fault samples behind `growth` (each stands for the faults since the one before).
    pub samples: u64,
    /// New and copied pages by (origin, mechanism), most bytes first.
    pub growth: Vec<GrowthEntry>,
    /// The heaviest distinct stacks, most bytes first (the lighter rest summed into one
    /// `[other stacks]` entry per origin and mechanism).
    pub stacks: Vec<GrowthStack>,
}

/// Bytes attributed to one (origin, mechanism) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthEntry {
    /// What Redis was doing (a command, `client.io`, `cron.*`, ...).
    pub origin: String,
    /// What the pages are for: `allocation`, `allocation.reply_buffer`, `copy_on_write`, ...
    pub mechanism: String,
    pub bytes: u64,
    /// Fraction of the interval's attributed bytes.
    pub share: f64,
}

/// One distinct stack of the growth and the bytes faulted in under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowthStack {
    pub origin: String,
    pub mechanism: String,
    pub bytes: u64,
    pub samples: u64,
    /// Leaf first: kernel frames, then user frames down to `main`.
    #[serde(with = "crate::output::frame_text::frames")]
    pub frames: Vec<Frame>,
}

/// The `memory` record: growth in one `--interval`, sent only when the target took page
/// faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    #[serde(default)]
    pub instance: Instance,
    /// The interval's end.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub seconds: f64,
    #[serde(flatten)]
    pub growth: MemoryGrowth,
}
