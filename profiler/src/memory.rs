//! Memory growth by origin: the target's page-fault samples (each standing for the faults of
//! its kind since the one before, see the kernel's `memory` programs), named by the
//! attribution rules, summed per (origin, mechanism) and per stack, against the target's
//! resident size and what it advised away. A `memory` record per interval with faults, and the
//! run's totals in the summary.
//!
//! A write to a present, write-protected page is a copy on write only while a forked child
//! shares the page (Redis's BGSAVE, AOF rewrite, full sync): the target's resident size stays,
//! the host's memory grows. Without a child it is the first write to a page read before (the
//! kernel mapped its shared zero page): a new page like any other.
use std::{collections::HashMap, fs, time::SystemTime};

use profiler_common::{Counter, FAULT_KIND_WRITE_PROTECT, MadviseEvent, StackEvent};

use crate::{
    attribute::Attribution,
    output::record::{GrowthEntry, GrowthStack, MemoryGrowth, MemoryReport},
    stack::Frame,
};

/// Distinct stacks listed per record; the lighter rest is summed per attribution.
const MAX_STACKS: usize = 32;
/// Distinct stacks a period (the run above all) keeps; later ones are summed per attribution
/// from the start.
const MAX_KEPT_STACKS: usize = 4096;
/// `MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`: advice that gives memory back.
const GIVING_BACK_ADVICE: [i32; 3] = [4, 8, 9];

/// The kernel's fault counts of a target, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub new_pages: u64,
    pub write_protected: u64,
}

impl FaultCounts {
    /// The counts the kernel's `counter` gives. The faults taken before the fault programs
    /// were attached (on demand: the first of a burst) are not classified: they count as new
    /// pages, which most of them are.
    pub fn read<E>(mut counter: impl FnMut(Counter) -> Result<u64, E>) -> Result<Self, E> {
        Ok(Self {
            new_pages: counter(Counter::NewPageFaults)? + counter(Counter::FaultsUnclassified)?,
            write_protected: counter(Counter::WriteProtectFaults)?,
        })
    }

    fn since(self, earlier: FaultCounts) -> FaultCounts {
        FaultCounts {
            new_pages: self.new_pages.saturating_sub(earlier.new_pages),
            write_protected: self.write_protected.saturating_sub(earlier.write_protected),
        }
    }

    /// (bytes of new pages, bytes copied on write) of these faults; `forked`: a child shared
    /// the target's pages meanwhile.
    fn bytes(self, forked: bool, page_bytes: u64) -> (u64, u64) {
        if forked {
            (
                self.new_pages * page_bytes,
                self.write_protected * page_bytes,
            )
        } else {
            ((self.new_pages + self.write_protected) * page_bytes, 0)
        }
    }
}

/// What one period (an interval, or the run) saw.
#[derive(Debug, Clone, Default)]
struct Tally {
    /// (attribution, frames) -> (bytes, samples).
    stacks: HashMap<(Attribution, Vec<Frame>), (u64, u64)>,
    madvised_bytes: u64,
    /// Bytes of new pages and copied pages of the intervals already ended (the run's tally).
    ended_bytes: (u64, u64),
    /// The kernel's counts and the resident size when the period began.
    faults_at_start: FaultCounts,
    resident_at_start: Option<u64>,
}

impl Tally {
    fn new(faults: FaultCounts, resident: Option<u64>) -> Self {
        Self {
            faults_at_start: faults,
            resident_at_start: resident,
            ..Self::default()
        }
    }

    fn add(&mut self, attribution: &Attribution, frames: &[Frame], bytes: u64) {
        let mut key = (attribution.clone(), frames.to_vec());
        if self.stacks.len() >= MAX_KEPT_STACKS && !self.stacks.contains_key(&key) {
            key.1 = vec![Frame::OtherStacks];
        }
        let (total, samples) = self.stacks.entry(key).or_default();
        *total += bytes;
        *samples += 1;
    }

    /// The period's growth, up to `resident` now, with `faulted` bytes (new pages, copied).
    fn growth(
        &self,
        resident: Option<u64>,
        (new_page_bytes, copied_bytes): (u64, u64),
    ) -> MemoryGrowth {
        let resident_change_bytes = match (resident, self.resident_at_start) {
            (Some(now), Some(then)) => now as i64 - then as i64,
            _ => 0,
        };
        MemoryGrowth {
            resident_bytes: resident.unwrap_or(0),
            resident_change_bytes,
            new_page_bytes,
            copied_bytes,
            given_back_bytes: (new_page_bytes as i64 - resident_change_bytes).max(0) as u64,
            madvised_bytes: self.madvised_bytes,
            samples: self.stacks.values().map(|(_, samples)| samples).sum(),
            growth: self.growth_entries(),
            stacks: self.heaviest_stacks(),
        }
    }

    fn growth_entries(&self) -> Vec<GrowthEntry> {
        let mut by_attribution: HashMap<&Attribution, u64> = HashMap::new();
        for ((attribution, _), (bytes, _)) in &self.stacks {
            *by_attribution.entry(attribution).or_default() += bytes;
        }
        let total: u64 = by_attribution.values().sum();
        let mut entries: Vec<GrowthEntry> = by_attribution
            .into_iter()
            .map(|(attribution, bytes)| GrowthEntry {
                origin: attribution.origin.clone(),
                mechanism: attribution.mechanism.clone(),
                bytes,
                share: bytes as f64 / total.max(1) as f64,
            })
            .collect();
        entries.sort_by(|a, b| {
            (b.bytes, &a.origin, &a.mechanism).cmp(&(a.bytes, &b.origin, &b.mechanism))
        });
        entries
    }

    /// The [`MAX_STACKS`] heaviest stacks, then the rest summed per attribution.
    fn heaviest_stacks(&self) -> Vec<GrowthStack> {
        let mut stacks: Vec<GrowthStack> = self
            .stacks
            .iter()
            .map(|((attribution, frames), &(bytes, samples))| GrowthStack {
                origin: attribution.origin.clone(),
                mechanism: attribution.mechanism.clone(),
                bytes,
                samples,
                frames: frames.clone(),
            })
            .collect();
        let heaviest_first = |a: &GrowthStack, b: &GrowthStack| {
            (b.bytes, &a.origin, &a.mechanism, &a.frames).cmp(&(
                a.bytes,
                &b.origin,
                &b.mechanism,
                &b.frames,
            ))
        };
        stacks.sort_by(heaviest_first);
        let rest = stacks.split_off(stacks.len().min(MAX_STACKS));
        let mut others: Vec<GrowthStack> = Vec::new();
        for stack in rest {
            match others.iter_mut().find(|other| {
                (&other.origin, &other.mechanism) == (&stack.origin, &stack.mechanism)
            }) {
                Some(other) => {
                    other.bytes += stack.bytes;
                    other.samples += stack.samples;
                }
                None => others.push(GrowthStack {
                    frames: vec![Frame::OtherStacks],
                    ..stack
                }),
            }
        }
        others.sort_by(heaviest_first);
        stacks.extend(others);
        stacks
    }
}

/// The memory growth of one target, per interval and over the run.
pub struct MemoryWatch {
    pid: u32,
    page_bytes: u64,
    /// The resident size last read (kept when the process is gone).
    last_resident: Option<u64>,
    interval: Tally,
    /// Whether a forked child was seen in the current interval.
    forked: bool,
    run: Tally,
}

impl MemoryWatch {
    /// Watches process `pid`, whose kernel fault counts are `faults` now.
    pub fn new(pid: u32, faults: FaultCounts) -> Self {
        let resident = resident_bytes(pid);
        Self {
            pid,
            page_bytes: page_bytes(),
            last_resident: resident,
            interval: Tally::new(faults, resident),
            forked: false,
            run: Tally::new(faults, resident),
        }
    }

    /// Whether `event`, a page-fault sample, copied a page shared with a forked child (a
    /// child of the target now).
    pub fn is_copy_on_write(&mut self, event: &StackEvent) -> bool {
        event.fault_kind == FAULT_KIND_WRITE_PROTECT && self.note_children()
    }

    /// Whether the target has a child now (noted for the interval).
    fn note_children(&mut self) -> bool {
        let pid = self.pid;
        let has_child = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .is_ok_and(|children| !children.trim().is_empty());
        self.forked |= has_child;
        has_child
    }

    /// Watches process `pid` from now on (a new program, or the next process with
    /// `--follow`): its resident size is measured from now, the bytes so far kept.
    pub fn retarget(&mut self, pid: u32) {
        self.pid = pid;
        let resident = self.resident();
        self.interval.resident_at_start = resident;
        self.run.resident_at_start = resident;
    }

    /// A page-fault sample, named: its faults' bytes go to `attribution` and `frames`.
    pub fn add_sample(&mut self, event: &StackEvent, frames: &[Frame], attribution: &Attribution) {
        let bytes = event.faults * self.page_bytes;
        self.interval.add(attribution, frames, bytes);
        self.run.add(attribution, frames, bytes);
    }

    /// A madvise call of one of the target's threads.
    pub fn add_madvise(&mut self, event: &MadviseEvent) {
        if event.result == 0 && GIVING_BACK_ADVICE.contains(&event.advice) {
            self.interval.madvised_bytes += event.len;
            self.run.madvised_bytes += event.len;
        }
    }

    /// The interval that ends now, with the kernel's `faults` now: a record when the target
    /// took page faults in it (a healthy server in steady state takes none).
    pub fn take_interval(&mut self, faults: FaultCounts, seconds: f64) -> Option<MemoryReport> {
        let resident = self.resident();
        let faulted = self.interval_bytes(faults);
        self.forked = false;
        self.run.ended_bytes.0 += faulted.0;
        self.run.ended_bytes.1 += faulted.1;
        let ended = std::mem::replace(&mut self.interval, Tally::new(faults, resident));
        if faults == ended.faults_at_start && ended.stacks.is_empty() {
            return None;
        }
        Some(MemoryReport {
            instance: Default::default(),
            time: SystemTime::now(),
            seconds,
            growth: ended.growth(resident, faulted),
        })
    }

    /// The target's resident size now, or the last one read once it is gone.
    fn resident(&mut self) -> Option<u64> {
        if let Some(resident) = resident_bytes(self.pid) {
            self.last_resident = Some(resident);
        }
        self.last_resident
    }

    /// The current interval's faults up to `faults` now, in bytes (new pages, copied).
    fn interval_bytes(&mut self, faults: FaultCounts) -> (u64, u64) {
        let faulted = faults.since(self.interval.faults_at_start);
        let forked = self.note_children() || self.forked;
        faulted.bytes(forked, self.page_bytes)
    }

    /// The run's growth so far, with the kernel's `faults` now.
    pub fn run_growth(&mut self, faults: FaultCounts) -> MemoryGrowth {
        let current = self.interval_bytes(faults);
        let (new_pages, copied) = self.run.ended_bytes;
        let resident = self.resident();
        self.run
            .growth(resident, (new_pages + current.0, copied + current.1))
    }
}

/// The resident size of process `pid` (`VmRSS`), if it still runs.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:").map(|kib| kib * 1024)
}

/// A `kB` field of a `/proc/.../status` file.
pub fn status_kib(path: &str, field: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The system's page size.
fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(bytes).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribution(origin: &str, mechanism: &str) -> Attribution {
        Attribution {
            origin: origin.into(),
            mechanism: mechanism.into(),
        }
    }

    #[test]
    fn growth_is_summed_by_attribution_and_set_against_the_resident_change() {
        let mut tally = Tally::new(FaultCounts::default(), Some(100 << 20));
        let sadd = attribution("command:sadd", "allocation");
        let read = attribution("client.io", "allocation.query_buffer");
        let frames = |name: &str| vec![Frame::User(name.into()), Frame::User("main".into())];
        tally.add(&sadd, &frames("dictAdd"), 200 << 20);
        tally.add(&sadd, &frames("createSetObject"), 90 << 20);
        tally.add(&read, &frames("readQueryFromClient"), 20 << 20);
        let faults = FaultCounts {
            new_pages: (317 << 20) / 4096,
            write_protected: 1,
        };
        let growth = tally.growth(Some(412 << 20), faults.bytes(true, 4096));
        assert_eq!(growth.resident_change_bytes, 312 << 20);
        assert_eq!(growth.new_page_bytes, 317 << 20);
        assert_eq!(growth.given_back_bytes, 5 << 20);
        assert_eq!(growth.copied_bytes, 4096);
        assert_eq!(growth.samples, 3);
        let named: Vec<(&str, u64)> = growth
            .growth
            .iter()
            .map(|entry| (entry.origin.as_str(), entry.bytes >> 20))
            .collect();
        assert_eq!(named, [("command:sadd", 290), ("client.io", 20)]);
        assert_eq!(growth.stacks[0].frames[0], Frame::User("dictAdd".into()));
        assert!((growth.growth[0].share - 290.0 / 310.0).abs() < 1e-9);
    }

    #[test]
    fn stacks_beyond_the_heaviest_are_summed_per_attribution() {
        let mut tally = Tally::default();
        let sadd = attribution("command:sadd", "allocation");
        for index in 0..MAX_STACKS as u64 + 5 {
            tally.add(
                &sadd,
                &[Frame::User(format!("f{index}").into())],
                4096 * (index + 1),
            );
        }
        let stacks = tally.heaviest_stacks();
        assert_eq!(stacks.len(), MAX_STACKS + 1);
        let other = stacks.last().unwrap();
        assert_eq!(other.frames, [Frame::OtherStacks]);
        assert_eq!(
            (other.bytes, other.samples),
            (4096 * (1 + 2 + 3 + 4 + 5), 5)
        );
    }

    #[test]
    fn an_interval_without_faults_sends_nothing() {
        let mut watch = MemoryWatch::new(std::process::id(), FaultCounts::default());
        assert_eq!(watch.take_interval(FaultCounts::default(), 1.0), None);
        let faults = FaultCounts {
            new_pages: 3,
            write_protected: 0,
        };
        let report = watch.take_interval(faults, 1.0).expect("faults were taken");
        assert_eq!(report.growth.new_page_bytes, 3 * page_bytes());
        assert!(report.growth.resident_bytes > 0, "our own VmRSS");
        let run = watch.run_growth(FaultCounts {
            new_pages: 4,
            write_protected: 2,
        });
        // No child: the writes to write-protected pages were first writes (new pages).
        assert_eq!(
            (run.new_page_bytes, run.copied_bytes),
            (6 * page_bytes(), 0)
        );
    }

    #[test]
    fn write_protect_faults_are_copies_only_while_a_child_shares_the_pages() {
        let faults = FaultCounts {
            new_pages: 10,
            write_protected: 5,
        };
        assert_eq!(faults.bytes(true, 4096), (40_960, 20_480));
        assert_eq!(faults.bytes(false, 4096), (61_440, 0));
    }
}
