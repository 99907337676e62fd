//! Event-time windows.

/// A window of event time.
///
/// Tumbling and hopping windows are `[start, end)`. A session window is `[start, end]` where
/// `start` and `end` are its first and last event times. A sliding ("last N") window is
/// `(start, end]`: the events after `end - size` up to the stream time `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

/// Which windows an aggregation computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    /// Fixed-size, non-overlapping windows aligned to the epoch.
    Tumbling { size_ms: i64 },
    /// Fixed-size windows starting every `advance_ms` (an event falls into `size / advance`
    /// windows).
    Hopping { size_ms: i64, advance_ms: i64 },
    /// Per key, events closer than `gap_ms` to each other belong to one session.
    Session { gap_ms: i64 },
    /// Per key, one rolling value: the events in `(st - size, st]`, where `st` is the stream
    /// time. "Orders in the last 30 days" is `Sliding { size_ms: 30 days }`. Values decay as
    /// stream time passes, without new events for the key.
    Sliding { size_ms: i64 },
}

impl WindowSpec {
    /// The tumbling or hopping windows containing `t`, latest start first. Empty for session
    /// and sliding windows (their windows depend on state).
    pub fn windows_for(&self, t: i64) -> Vec<Window> {
        let Some((size, advance)) = self.size_and_advance() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity((size / advance.max(1)) as usize + 1);
        let mut start = t.div_euclid(advance) * advance;
        while start + size > t {
            out.push(Window {
                start,
                end: start + size,
            });
            start -= advance;
        }
        out
    }

    /// The end of the first tumbling or hopping window containing `t` to close: windows end
    /// at `k·advance + size`, and this is the first such end after `t` (of the windows holding
    /// `t`, the one covering the most time before it). `None` for session and sliding windows.
    pub fn closing_next(&self, t: i64) -> Option<i64> {
        let (size, advance) = self.size_and_advance()?;
        Some(((t - size).div_euclid(advance) + 1) * advance + size)
    }

    /// Size and advance of tumbling (advance = size) and hopping windows.
    fn size_and_advance(&self) -> Option<(i64, i64)> {
        match *self {
            WindowSpec::Tumbling { size_ms } => Some((size_ms, size_ms)),
            WindowSpec::Hopping {
                size_ms,
                advance_ms,
            } => Some((size_ms, advance_ms)),
            _ => None,
        }
    }

    /// Checks sizes: positive, and a hop no larger than the window.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            WindowSpec::Tumbling { size_ms } | WindowSpec::Sliding { size_ms } if size_ms <= 0 => {
                Err("window size must be positive".into())
            }
            WindowSpec::Hopping {
                size_ms,
                advance_ms,
            } if size_ms <= 0 || advance_ms <= 0 || advance_ms > size_ms => {
                Err("hopping windows need 0 < advance <= size".into())
            }
            WindowSpec::Session { gap_ms } if gap_ms < 0 => {
                Err("session gap must not be negative".into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_closing_next_is_the_earliest_ending_window_holding_the_time() {
        let specs = [
            WindowSpec::Hopping {
                size_ms: 60,
                advance_ms: 15,
            },
            WindowSpec::Tumbling { size_ms: 10 },
        ];
        for spec in specs {
            for t in -130..130 {
                let earliest = spec.windows_for(t).iter().map(|w| w.end).min();
                assert_eq!(spec.closing_next(t), earliest, "{spec:?} at {t}");
            }
        }
        assert_eq!(WindowSpec::Session { gap_ms: 5 }.closing_next(3), None);
    }

    #[test]
    fn hopping_windows_cover_the_event_exactly() {
        let spec = WindowSpec::Hopping {
            size_ms: 10,
            advance_ms: 5,
        };
        assert_eq!(
            spec.windows_for(12),
            vec![Window { start: 10, end: 20 }, Window { start: 5, end: 15 }]
        );
        assert_eq!(
            spec.windows_for(-1),
            vec![Window { start: -5, end: 5 }, Window { start: -10, end: 0 }]
        );
        let tumbling = WindowSpec::Tumbling { size_ms: 10 };
        assert_eq!(
            tumbling.windows_for(10),
            vec![Window { start: 10, end: 20 }]
        );
    }
}
