//! The kernel's iteration histogram (cumulative bucket counts) -> per-interval and whole-run
//! statistics via hdrhistogram. Each bucket's count is recorded at the bucket's midpoint, so
//! percentiles are within about 3% of the true value; the maximum is exact.
use hdrhistogram::Histogram;
use profiler_common::iteration_bucket_range_ns;

/// Longest iteration recordable: one hour; longer ones are recorded as one hour.
const LONGEST_RECORDED_NS: u64 = 3_600_000_000_000;

/// Iteration statistics over some period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IterationStats {
    pub iterations: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// Accumulates the kernel's cumulative bucket counts into an interval and a whole-run view.
pub struct IterationHistogram {
    previous: Vec<u64>,
    interval: Histogram<u64>,
    interval_max_ns: u64,
    total: Histogram<u64>,
    total_max_ns: u64,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LONGEST_RECORDED_NS, 3).expect("constant bounds are valid")
}

impl Default for IterationHistogram {
    fn default() -> Self {
        Self {
            previous: Vec::new(),
            interval: new_histogram(),
            interval_max_ns: 0,
            total: new_histogram(),
            total_max_ns: 0,
        }
    }
}

impl IterationHistogram {
    /// Adds what the kernel counted since the last update: `buckets` are its cumulative counts,
    /// `max_ns` the longest iteration since the last update. Returns the iterations added, as
    /// (bucket midpoint in ns, count).
    pub fn update(&mut self, buckets: &[u64], max_ns: u64) -> Vec<(u64, u64)> {
        let mut added_iterations = Vec::new();
        self.previous.resize(buckets.len(), 0);
        for (bucket, (&count, previous)) in buckets.iter().zip(&mut self.previous).enumerate() {
            let added = count.saturating_sub(*previous);
            *previous = count;
            if added == 0 {
                continue;
            }
            let (low, high) = iteration_bucket_range_ns(bucket as u32);
            let midpoint = (low + (high - low) / 2).clamp(1, LONGEST_RECORDED_NS);
            // Cannot fail: the value is clamped into the histogram's range.
            let _ = self.interval.record_n(midpoint, added);
            let _ = self.total.record_n(midpoint, added);
            added_iterations.push((midpoint, added));
        }
        self.interval_max_ns = self.interval_max_ns.max(max_ns);
        self.total_max_ns = self.total_max_ns.max(max_ns);
        added_iterations
    }

    /// The kernel's counts start again from zero (new probes after a restart of the target).
    pub fn restart_kernel_counts(&mut self) {
        self.previous.clear();
    }

    /// Statistics since the previous call, and starts a new interval.
    pub fn take_interval(&mut self) -> IterationStats {
        let stats = stats(&self.interval, self.interval_max_ns);
        self.interval.reset();
        self.interval_max_ns = 0;
        stats
    }

    /// Statistics over the whole run.
    pub fn total(&self) -> IterationStats {
        stats(&self.total, self.total_max_ns)
    }
}

fn stats(histogram: &Histogram<u64>, max_ns: u64) -> IterationStats {
    if histogram.is_empty() {
        return IterationStats::default();
    }
    // A percentile never exceeds the exact maximum (midpoints can).
    let at = |quantile| histogram.value_at_quantile(quantile).min(max_ns.max(1));
    IterationStats {
        iterations: histogram.len(),
        p50_ns: at(0.5),
        p99_ns: at(0.99),
        p999_ns: at(0.999),
        max_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::{ITERATION_BUCKETS, iteration_bucket};

    fn kernel_buckets(durations_ns: &[u64], into: &mut [u64]) {
        for &duration in durations_ns {
            into[iteration_bucket(duration) as usize] += 1;
        }
    }

    #[test]
    fn percentiles_are_within_a_few_percent() {
        let mut buckets = vec![0; ITERATION_BUCKETS as usize];
        let durations: Vec<u64> = (1..=1000).map(|i| i * 10_000).collect(); // 10us .. 10ms
        kernel_buckets(&durations, &mut buckets);
        let mut histogram = IterationHistogram::default();
        histogram.update(&buckets, 10_000_000);
        let stats = histogram.take_interval();
        assert_eq!(stats.iterations, 1000);
        let close = |value: u64, expected: f64| (value as f64 - expected).abs() / expected < 0.04;
        assert!(close(stats.p50_ns, 5_000_000.0), "{stats:?}");
        assert!(close(stats.p99_ns, 9_900_000.0), "{stats:?}");
        assert_eq!(stats.max_ns, 10_000_000);
    }

    #[test]
    fn intervals_see_only_what_was_added_and_the_total_sees_everything() {
        let mut buckets = vec![0; ITERATION_BUCKETS as usize];
        let mut histogram = IterationHistogram::default();
        kernel_buckets(&[1_000; 10], &mut buckets);
        histogram.update(&buckets, 1_000);
        assert_eq!(histogram.take_interval().iterations, 10);
        kernel_buckets(&[250_000_000], &mut buckets);
        histogram.update(&buckets, 250_000_000);
        let interval = histogram.take_interval();
        assert_eq!(interval.iterations, 1);
        assert_eq!(interval.max_ns, 250_000_000);
        assert_eq!(histogram.take_interval(), IterationStats::default());
        let total = histogram.total();
        assert_eq!(total.iterations, 11);
        assert_eq!(total.max_ns, 250_000_000);
        assert!(total.p50_ns <= 1_100, "{total:?}");
    }
}
