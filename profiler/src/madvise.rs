//! madvise calls of every thread of the target -> per thread role and advice: calls, bytes
//! and a latency histogram, for the summary. Roles come from thread names (`comm`): `main`,
//! Redis's `bio_*` threads, `io_thd_*`, `jemalloc_bg_thd`, else `other`.
use std::{collections::HashMap, fs};

use hdrhistogram::Histogram;
use profiler_common::MadviseEvent;

use crate::{bounded::BoundedMap, output::record::MadviseSummary};

/// `MADV_*` names by value (Linux `include/uapi/asm-generic/mman-common.h`).
const ADVICE_NAMES: [(i32, &str); 26] = [
    (0, "MADV_NORMAL"),
    (1, "MADV_RANDOM"),
    (2, "MADV_SEQUENTIAL"),
    (3, "MADV_WILLNEED"),
    (4, "MADV_DONTNEED"),
    (8, "MADV_FREE"),
    (9, "MADV_REMOVE"),
    (10, "MADV_DONTFORK"),
    (11, "MADV_DOFORK"),
    (12, "MADV_MERGEABLE"),
    (13, "MADV_UNMERGEABLE"),
    (14, "MADV_HUGEPAGE"),
    (15, "MADV_NOHUGEPAGE"),
    (16, "MADV_DONTDUMP"),
    (17, "MADV_DODUMP"),
    (18, "MADV_WIPEONFORK"),
    (19, "MADV_KEEPONFORK"),
    (20, "MADV_COLD"),
    (21, "MADV_PAGEOUT"),
    (22, "MADV_POPULATE_READ"),
    (23, "MADV_POPULATE_WRITE"),
    (24, "MADV_DONTNEED_LOCKED"),
    (25, "MADV_COLLAPSE"),
    (100, "MADV_HWPOISON"),
    (101, "MADV_SOFT_OFFLINE"),
    (102, "MADV_GUARD_INSTALL"),
];

/// The name of an advice value; `MADV_<n>` for one this table does not know.
pub fn advice_name(advice: i32) -> String {
    ADVICE_NAMES
        .iter()
        .find(|(value, _)| *value == advice)
        .map_or_else(|| format!("MADV_{advice}"), |(_, name)| (*name).to_owned())
}

/// The role of a thread of a Redis server, from its name.
pub fn thread_role(pid: u32, tid: u32, name: &str) -> String {
    if tid == pid {
        return "main".to_owned();
    }
    if name.starts_with("bio_") || name.starts_with("io_thd_") || name == "jemalloc_bg_thd" {
        return name.to_owned();
    }
    "other".to_owned()
}

/// Thread roles remembered by tid (forgotten all at once past this: threads come and go).
const MAX_REMEMBERED_THREADS: usize = 4096;
/// (role, advice) pairs with totals of their own; the rest go under ("other", "other"): roles
/// come from the target's thread names and advice from its calls' arguments.
const MAX_TOTALS: usize = 256;

struct Totals {
    calls: u64,
    bytes: u64,
    duration_ns: Histogram<u64>,
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            calls: 0,
            bytes: 0,
            duration_ns: Histogram::new_with_bounds(1, 3_600_000_000_000, 2)
                .expect("constant bounds are valid"),
        }
    }
}

/// Accumulates every madvise call of the target.
pub struct MadviseStats {
    pid: u32,
    /// Thread roles by tid, read from `/proc` the first time a thread is seen.
    roles: HashMap<u32, String>,
    totals: BoundedMap<(String, String), Totals>,
}

impl MadviseStats {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            roles: HashMap::new(),
            totals: BoundedMap::new(MAX_TOTALS),
        }
    }

    /// Counts the calls of process `pid` from now on (after a restart or an exec), with the
    /// totals so far.
    pub fn follow(&mut self, pid: u32) {
        self.pid = pid;
        self.roles.clear();
    }

    /// Counts a call; returns its thread role and advice name.
    pub fn add(&mut self, event: &MadviseEvent) -> (String, String) {
        let pid = self.pid;
        if self.roles.len() >= MAX_REMEMBERED_THREADS && !self.roles.contains_key(&event.tid) {
            self.roles.clear();
        }
        let role = self
            .roles
            .entry(event.tid)
            .or_insert_with(|| {
                let name = fs::read_to_string(format!("/proc/{pid}/task/{}/comm", event.tid))
                    .unwrap_or_default();
                thread_role(pid, event.tid, name.trim())
            })
            .clone();
        let key = (role, advice_name(event.advice));
        let named = if self.totals.keeps(&key) {
            key.clone()
        } else {
            ("other".to_owned(), "other".to_owned())
        };
        let totals = self.totals.entry(key);
        totals.calls += 1;
        totals.bytes += event.len;
        let _ = totals
            .duration_ns
            .record(event.duration_ns.clamp(1, 3_600_000_000_000));
        named
    }

    /// One line per thread role and advice, sorted (then `other` for the rest).
    pub fn summary(&self) -> Vec<MadviseSummary> {
        let mut own: Vec<(&(String, String), &Totals)> = self.totals.iter().collect();
        own.sort_by_key(|(key, _)| *key);
        let other = ("other".to_owned(), "other".to_owned());
        own.into_iter()
            .chain(self.totals.other().map(|totals| (&other, totals)))
            .map(|((role, advice), totals)| MadviseSummary {
                thread_role: role.clone(),
                advice: advice.clone(),
                calls: totals.calls,
                bytes: totals.bytes,
                p50_us: totals.duration_ns.value_at_quantile(0.5) / 1_000,
                p99_us: totals.duration_ns.value_at_quantile(0.99) / 1_000,
                max_us: totals.duration_ns.max() / 1_000,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::EVENT_KIND_MADVISE;

    use super::*;

    #[test]
    fn advice_values_have_their_kernel_names() {
        assert_eq!(advice_name(4), "MADV_DONTNEED");
        assert_eq!(advice_name(8), "MADV_FREE");
        assert_eq!(advice_name(77), "MADV_77");
    }

    #[test]
    fn thread_roles_follow_redis_thread_names() {
        assert_eq!(thread_role(10, 10, "redis-server"), "main");
        assert_eq!(thread_role(10, 11, "bio_lazy_free"), "bio_lazy_free");
        assert_eq!(thread_role(10, 12, "jemalloc_bg_thd"), "jemalloc_bg_thd");
        assert_eq!(thread_role(10, 13, "io_thd_3"), "io_thd_3");
        assert_eq!(thread_role(10, 14, "redis-rdb-bgsave"), "other");
    }

    #[test]
    fn calls_are_summed_per_role_and_advice() {
        let pid = std::process::id();
        let mut stats = MadviseStats::new(pid);
        let event = |len, duration_ns, advice| MadviseEvent {
            kind: EVENT_KIND_MADVISE,
            tid: pid,
            start_ns: 0,
            duration_ns,
            len,
            iteration_start_ns: 0,
            advice,
            result: 0,
            pid,
            _padding: 0,
        };
        stats.add(&event(4096, 2_000, 4));
        stats.add(&event(1 << 20, 900_000, 4));
        stats.add(&event(8192, 1_000, 8));
        let summary = stats.summary();
        assert_eq!(summary.len(), 2);
        let dontneed = &summary[0];
        assert_eq!(
            (dontneed.thread_role.as_str(), dontneed.advice.as_str()),
            ("main", "MADV_DONTNEED")
        );
        assert_eq!((dontneed.calls, dontneed.bytes), (2, 4096 + (1 << 20)));
        assert!((895..=905).contains(&dontneed.max_us), "{dontneed:?}");
        assert_eq!(summary[1].advice, "MADV_FREE");
    }
}
