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
        // Checked: near the ends of `i64` (292 million years from 1970) the windows that
        // cannot be represented are left out rather than wrapping into an endless walk.
        let mut start = t.div_euclid(advance).checked_mul(advance);
        while let Some(s) = start {
            match s.checked_add(size) {
                Some(end) if end > t => out.push(Window { start: s, end }),
                Some(_) => break,
                None => {}
            }
            start = s.checked_sub(advance);
        }
        out
    }

    /// The end of the first tumbling or hopping window containing `t` to close: windows end
    /// at `k·advance + size`, and this is the first such end after `t` (of the windows holding
    /// `t`, the one covering the most time before it). `None` for session and sliding windows.
    pub fn closing_next(&self, t: i64) -> Option<i64> {
        let (size, advance) = self.size_and_advance()?;
        (t.checked_sub(size)?.div_euclid(advance) + 1)
            .checked_mul(advance)?
            .checked_add(size)
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
    fn times_at_the_ends_of_i64_have_no_window_instead_of_overflowing() {
        let hopping = WindowSpec::Hopping {
            size_ms: 10,
            advance_ms: 3,
        };
        for spec in [WindowSpec::Tumbling { size_ms: 10 }, hopping] {
            for t in [i64::MIN, i64::MIN + 1] {
                assert!(spec.windows_for(t).is_empty(), "{spec:?} at {t}");
                assert_eq!(spec.closing_next(t), None, "{spec:?} at {t}");
            }
            // Near the top, the windows that fit are there, and the one closing next is
            // the earliest ending of them.
            for t in [i64::MAX - 20, i64::MAX - 1, i64::MAX] {
                let earliest = spec.windows_for(t).iter().map(|w| w.end).min();
                assert_eq!(spec.closing_next(t), earliest, "{spec:?} at {t}");
            }
            assert!(!spec.windows_for(i64::MAX - 20).is_empty());
        }
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
