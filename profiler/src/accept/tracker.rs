//! Accept-queue samples -> drops per sample interval and port, handed to the stall they
//! happened in or reported on their own, and the longest queue per stall and port.
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::sampler::ListenerSample;
use crate::{
    clock::WallClock,
    output::record::{AcceptOverflow, PortOverflows, StallAccept},
};

/// Samples kept to attribute drops to stalls: at the default 10 ms, a minute.
const HISTORY_SAMPLES: usize = 6_000;

/// The drops of one sample interval on one port.
#[derive(Debug, Clone, Copy)]
struct Drops {
    time_ns: u64,
    port: u16,
    overflows: u64,
    max_queue: u32,
    limit: u32,
}

/// Turns samples into drops per interval and hands them to stalls or to `accept_overflow`.
#[derive(Debug, Default)]
pub struct AcceptTracker {
    /// Last drop counter per listening socket (inode).
    last_drops: HashMap<u64, u64>,
    /// Queue samples (time, port, queue, limit) for the stalls' longest queue.
    queues: VecDeque<(u64, u16, u32, u32)>,
    /// Drops not yet given to a stall or reported.
    unattributed: VecDeque<Drops>,
    totals: BTreeMap<u16, PortOverflows>,
}

impl AcceptTracker {
    /// Takes in a sample made at `time_ns`; returns each port's longest queue and new drops.
    pub fn add(&mut self, time_ns: u64, samples: &[ListenerSample]) -> Vec<(u16, u32, u64)> {
        // Per port: (longest queue, limit, new drops), summed over its sockets.
        let mut ports: BTreeMap<u16, (u32, u32, u64)> = BTreeMap::new();
        for sample in samples {
            let previous = self.last_drops.insert(sample.inode, sample.drops);
            let overflows = previous.map_or(0, |previous| sample.drops.saturating_sub(previous));
            let (queue, limit, drops) = ports.entry(sample.port).or_default();
            *queue = (*queue).max(sample.queue);
            *limit = (*limit).max(sample.limit);
            *drops += overflows;
        }
        let mut added = Vec::new();
        for (port, (queue, limit, overflows)) in ports {
            let total = self.totals.entry(port).or_insert_with(|| PortOverflows {
                port,
                ..Default::default()
            });
            total.max_queue = total.max_queue.max(queue);
            total.limit = limit;
            total.overflows += overflows;
            if overflows > 0 {
                self.unattributed.push_back(Drops {
                    time_ns,
                    port,
                    overflows,
                    max_queue: queue,
                    limit,
                });
            }
            self.queues.push_back((time_ns, port, queue, limit));
            added.push((port, queue, overflows));
        }
        while self.queues.len() > HISTORY_SAMPLES {
            self.queues.pop_front();
        }
        added
    }

    /// The accept queues of the stall from `start_ns` to `end_ns` (sample just before asking).
    pub fn stall(&mut self, start_ns: u64, end_ns: u64) -> StallAccept {
        let mut accept = StallAccept::default();
        for &(time_ns, _, queue, limit) in &self.queues {
            if (start_ns..=end_ns).contains(&time_ns) && queue >= accept.max_queue {
                accept.max_queue = queue;
                accept.limit = limit;
            }
        }
        self.unattributed.retain(|drops| {
            let inside = (start_ns..=end_ns).contains(&drops.time_ns);
            if inside {
                accept.overflows += drops.overflows;
                accept.max_queue = accept.max_queue.max(drops.max_queue);
                accept.limit = accept.limit.max(drops.limit);
            }
            !inside
        });
        accept
    }

    /// Drops that happened before `before_ns` and belong to no stall, one report per port
    /// (timed at its first drop).
    pub fn take_outside_stalls(
        &mut self,
        before_ns: u64,
        clock: &WallClock,
    ) -> Vec<AcceptOverflow> {
        let mut reported: Vec<AcceptOverflow> = Vec::new();
        while self
            .unattributed
            .front()
            .is_some_and(|drops| drops.time_ns < before_ns)
        {
            let drops = self.unattributed.pop_front().expect("checked above");
            match reported.iter_mut().find(|report| report.port == drops.port) {
                Some(report) => {
                    report.overflows += drops.overflows;
                    report.max_queue = report.max_queue.max(drops.max_queue);
                }
                None => reported.push(AcceptOverflow {
                    instance: Default::default(),
                    time: clock.at(drops.time_ns),
                    port: drops.port,
                    overflows: drops.overflows,
                    max_queue: drops.max_queue,
                    limit: drops.limit,
                }),
            }
        }
        reported
    }

    pub fn ports(&self) -> Vec<PortOverflows> {
        self.totals.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(port: u16, queue: u32, drops: u64) -> ListenerSample {
        ListenerSample {
            inode: u64::from(port),
            port,
            queue,
            limit: 16,
            drops,
        }
    }

    #[test]
    fn drops_inside_a_stall_belong_to_it_and_the_others_are_reported() {
        let mut tracker = AcceptTracker::default();
        tracker.add(100, &[sample(6379, 0, 5)]);
        tracker.add(200, &[sample(6379, 3, 7)]); // before the stall: 2
        tracker.add(300, &[sample(6379, 17, 27)]); // in it: 20
        tracker.add(400, &[sample(6379, 17, 57)]); // in it: 30
        tracker.add(500, &[sample(6379, 0, 58)]); // after it: 1
        let stall = tracker.stall(250, 450);
        assert_eq!(
            stall,
            StallAccept {
                overflows: 50,
                max_queue: 17,
                limit: 16,
                ..Default::default()
            }
        );
        let reported = tracker.take_outside_stalls(1_000, &WallClock::new());
        let overflows: Vec<u64> = reported.iter().map(|r| r.overflows).collect();
        assert_eq!(
            overflows,
            [3],
            "the drops before and after the stall, in one report for the port"
        );
        assert_eq!(
            tracker.ports()[0].overflows,
            53,
            "the first sample is the baseline"
        );
    }

    #[test]
    fn the_ipv4_and_ipv6_listeners_of_a_port_are_counted_apart_then_summed() {
        let mut tracker = AcceptTracker::default();
        let v4 = |drops| ListenerSample {
            inode: 1,
            port: 6379,
            queue: 2,
            limit: 16,
            drops,
        };
        let v6 = |drops| ListenerSample {
            inode: 2,
            port: 6379,
            queue: 5,
            limit: 16,
            drops,
        };
        tracker.add(100, &[v4(500), v6(0)]);
        assert_eq!(tracker.add(200, &[v4(510), v6(3)]), [(6379, 5, 13)]);
        assert_eq!(tracker.add(300, &[v4(510), v6(3)]), [(6379, 5, 0)]);
        assert_eq!(tracker.ports()[0].overflows, 13);
    }
}
