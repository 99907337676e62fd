//! A fixed-bucket latency histogram in the Prometheus layout: cumulative `le` buckets, `_sum`
//! and `_count`. Recording is two relaxed atomic adds, so the sinks can record every applied
//! update.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in milliseconds: fine below 10 ms (the embedded freshness target), then
/// steps of at most half up to 100 ms and two more to 250 ms, so that a p99 around the Kafka
/// target (50 ms) reads as 40, 60 or 75 rather than "between 50 and 100", and coarse up to a
/// minute (a lagging or replaying consumer).
const BOUNDS_MS: [u64; 20] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 75, 100, 150, 250, 500, 1_000, 10_000, 60_000,
];

/// Counts of latencies in milliseconds, by bucket.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// `buckets[i]` counts values in `(BOUNDS_MS[i-1], BOUNDS_MS[i]]`; the last one counts the
    /// values above every bound.
    buckets: [AtomicU64; BOUNDS_MS.len() + 1],
    sum_ms: AtomicU64,
}

impl LatencyHistogram {
    /// Records one latency. Negative values (an event time in the future: a source's clock
    /// ahead of ours) count as 0.
    pub fn record_ms(&self, ms: i64) {
        let ms = ms.max(0) as u64;
        let i = BOUNDS_MS.partition_point(|&b| b < ms);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Records one duration, rounded up to whole milliseconds (so 0.3 ms counts as ≤ 1 ms,
    /// not as 0).
    pub fn record(&self, elapsed: Duration) {
        let ms = elapsed.as_micros().div_ceil(1_000);
        self.record_ms(i64::try_from(ms).unwrap_or(i64::MAX));
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the series of `name` (in seconds, as Prometheus names want) with `labels`
    /// (`key="value"` pairs, comma-separated; empty for none). The `# HELP`/`# TYPE` lines are
    /// the caller's, once per name.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BOUNDS_MS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                *bound as f64 / 1000.0
            );
        }
        cumulative += self.buckets[BOUNDS_MS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}\n{name}_count{braces} {cumulative}",
            self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_bucket_of_their_upper_bound() {
        let h = LatencyHistogram::default();
        for ms in [-5, 0, 1, 2, 4, 5, 6, 70_000] {
            h.record_ms(ms);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "kind=\"entity\"");
        // -5, 0 and 1 are <= 1 ms; 2 is <= 2 ms; 4 and 5 are <= 5 ms; 6 is <= 7 ms.
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"0.001\"} 3\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"0.002\"} 4\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"0.003\"} 4\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"0.005\"} 6\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"0.007\"} 7\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"60\"} 7\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"entity\",le=\"+Inf\"} 8\n"));
        assert!(out.contains("x_seconds_sum{kind=\"entity\"} 70.018\n"));
        assert!(out.contains("x_seconds_count{kind=\"entity\"} 8\n"));
        assert_eq!(h.count(), 8);
    }

    #[test]
    fn durations_round_up_to_whole_milliseconds() {
        let h = LatencyHistogram::default();
        for us in [0, 300, 1_000, 1_001, 2_999] {
            h.record(Duration::from_micros(us));
        }
        let mut out = String::new();
        h.render(&mut out, "z_seconds", "");
        // 0, 0.3 and 1 ms are <= 1 ms; 1.001 ms is <= 2 ms; 2.999 ms is <= 3 ms.
        assert!(out.contains("z_seconds_bucket{le=\"0.001\"} 3\n"), "{out}");
        assert!(out.contains("z_seconds_bucket{le=\"0.002\"} 4\n"), "{out}");
        assert!(out.contains("z_seconds_bucket{le=\"0.003\"} 5\n"), "{out}");
        assert!(out.contains("z_seconds_sum 0.007\n"), "{out}");
    }

    #[test]
    fn an_empty_histogram_renders_zeros_without_labels() {
        let h = LatencyHistogram::default();
        let mut out = String::new();
        h.render(&mut out, "y_seconds", "");
        assert!(out.contains("y_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(out.contains("y_seconds_sum 0\n"));
        assert!(out.contains("y_seconds_count 0\n"));
        assert_eq!(h.count(), 0);
    }
}
