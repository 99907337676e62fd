//! Exponential backoff with jitter, and the retry loop every stage uses.
//!
//! [`Backoff`] is a pure schedule: given the attempt number and the time spent so far it says
//! how long to wait before the next attempt, or that the budget is spent. It owns a small
//! seeded random generator, so tests replay a schedule exactly without sleeping.

use std::time::Duration;

use kontext_core::config::{Jitter, RetryPolicy};
use kontext_core::record::TopicPartition;
use kontext_log::{Log, LogError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// An unbounded wait: the delays of [`Backoff`] for an operation retried until it succeeds
/// (or the caller stops on shutdown).
#[derive(Debug, Clone)]
pub struct Waiter {
    backoff: Backoff,
    started: std::time::Instant,
}

impl Waiter {
    /// A wait with `policy`'s delays and jitter; its limits, if any, are ignored.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            backoff: Backoff::unseeded(RetryPolicy {
                max_attempts: None,
                max_elapsed: None,
                ..policy
            }),
            started: std::time::Instant::now(),
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let max = self.backoff.policy().max_delay;
        self.backoff
            .next_delay(self.started.elapsed())
            .unwrap_or(max)
    }
}

/// `policy` with its delays capped at 5 s, for waiting until a killed member leaves a consumer
/// group (its session times out within a minute): take over soon after it does.
pub fn group_busy_policy(policy: RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        max_delay: policy.max_delay.min(Duration::from_secs(5)),
        ..policy
    }
}

/// How long a rewind waits for a group's stale members to expire: longer than Kafka's default
/// `session.timeout.ms` (45 s), so a killed member has left the group by then.
pub const GROUP_BUSY_WAIT: Duration = Duration::from_secs(60);

/// Rewinds `group` to `offsets` (`Log::reset_group_offsets`), as the sinks and the processor
/// do when the group committed past their state. A member of a killed process stays in a
/// Kafka group until its session times out: a busy group (and a transient error) is retried
/// for up to [`GROUP_BUSY_WAIT`], with `policy`'s delays capped by [`group_busy_policy`],
/// rather than skipping records. `Ok(false)`: `shutdown` came first (the group may or may not
/// have been rewound; the next start decides again).
pub async fn rewind_group(
    log: &dyn Log,
    group: &str,
    offsets: &[(TopicPartition, i64)],
    policy: RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<bool, LogError> {
    let deadline = tokio::time::Instant::now() + GROUP_BUSY_WAIT;
    let mut wait = Waiter::new(group_busy_policy(policy));
    loop {
        let attempt = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(false),
            attempt = log.reset_group_offsets(group, offsets) => attempt,
        };
        match attempt {
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && (matches!(e, LogError::GroupBusy(_)) || e.is_transient()) =>
            {
                let delay = wait.next_delay();
                warn!(%group, error = %e, retry_in = ?delay, "cannot rewind the group yet (a member is still registered); retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            done => return done.map(|()| true),
        }
    }
}

/// The delays of one retried operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    /// Attempts made so far.
    attempts: u32,
    /// The un-jittered delay before the next attempt.
    next: Duration,
    rng: SplitMix64,
}

impl Backoff {
    /// A schedule for `policy`, its jitter drawn from `seed`.
    pub fn new(policy: RetryPolicy, seed: u64) -> Self {
        Self {
            next: policy.first_delay,
            policy,
            attempts: 0,
            rng: SplitMix64(seed),
        }
    }

    /// A schedule whose jitter is seeded from the clock and the schedule's address: enough
    /// to keep many sinks out of lockstep.
    pub fn unseeded(policy: RetryPolicy) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut b = Self::new(policy, nanos);
        b.rng.0 ^= (&b as *const Backoff as u64).rotate_left(32);
        b
    }

    /// Records a failed attempt made `elapsed` after the first one began and returns how long
    /// to wait before the next, or `None` when the policy's attempts or time are spent (a
    /// delay that would start the next attempt past `max_elapsed` also ends the schedule).
    pub fn next_delay(&mut self, elapsed: Duration) -> Option<Duration> {
        self.attempts = self.attempts.saturating_add(1);
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.attempts >= max)
        {
            return None;
        }
        let nominal = self.next.min(self.policy.max_delay);
        self.next = nominal
            .mul_f64(self.policy.multiplier)
            .min(self.policy.max_delay);
        let delay = match self.policy.jitter {
            Jitter::None => nominal,
            Jitter::Full => nominal.mul_f64(self.rng.unit()),
            Jitter::Equal => nominal / 2 + (nominal / 2).mul_f64(self.rng.unit()),
        };
        if let Some(max) = self.policy.max_elapsed {
            if elapsed.saturating_add(delay) > max {
                return None;
            }
        }
        Some(delay)
    }

    /// Failed attempts recorded so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts the schedule over (after a success), keeping the random state.
    pub fn reset(&mut self) {
        self.attempts = 0;
        self.next = self.policy.first_delay;
    }

    /// The policy this schedule follows.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-distributed generator; jitter needs no
/// cryptographic quality and a dependency would buy nothing.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1]`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / ((1u64 << 53) - 1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter,
            max_attempts: None,
            max_elapsed: None,
        }
    }

    fn delays(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map_while(|_| b.next_delay(Duration::ZERO)).collect()
    }

    #[test]
    fn without_jitter_delays_double_from_100ms_and_stop_at_30s() {
        let mut b = Backoff::new(policy(Jitter::None), 1);
        let ms: Vec<u128> = delays(&mut b, 12).iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
    }

    #[test]
    fn equal_jitter_stays_between_half_and_the_whole_nominal_delay() {
        let nominal = delays(&mut Backoff::new(policy(Jitter::None), 1), 20);
        for seed in 0..200 {
            let got = delays(&mut Backoff::new(policy(Jitter::Equal), seed), 20);
            for (g, n) in got.iter().zip(&nominal) {
                assert!(
                    *g >= *n / 2 && g <= n,
                    "seed {seed}: {g:?} outside [{n:?}/2, {n:?}]"
                );
            }
        }
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let got: Vec<Duration> = (0..500)
            .map(|seed| Backoff::new(policy(Jitter::Full), seed).next_delay(Duration::ZERO))
            .map(Option::unwrap)
            .collect();
        assert!(got.iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(got.iter().any(|d| *d < Duration::from_millis(10)));
        assert!(got.iter().any(|d| *d > Duration::from_millis(90)));
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = delays(&mut Backoff::new(policy(Jitter::Full), 42), 10);
        let b = delays(&mut Backoff::new(policy(Jitter::Full), 42), 10);
        let c = delays(&mut Backoff::new(policy(Jitter::Full), 43), 10);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn max_attempts_counts_the_first_attempt() {
        let mut b = Backoff::new(
            RetryPolicy {
                max_attempts: Some(3),
                ..policy(Jitter::None)
            },
            0,
        );
        // attempt 1 fails -> wait, attempt 2 fails -> wait, attempt 3 fails -> give up
        assert_eq!(
            b.next_delay(Duration::ZERO),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            b.next_delay(Duration::ZERO),
            Some(Duration::from_millis(200))
        );
        assert_eq!(b.next_delay(Duration::ZERO), None);
        assert_eq!(b.attempts(), 3);
        b.reset();
        assert_eq!(
            b.next_delay(Duration::ZERO),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn max_elapsed_ends_the_schedule_before_a_late_attempt() {
        let mut b = Backoff::new(
            RetryPolicy {
                max_elapsed: Some(Duration::from_secs(1)),
                ..policy(Jitter::None)
            },
            0,
        );
        assert_eq!(
            b.next_delay(Duration::from_millis(500)),
            Some(Duration::from_millis(100))
        );
        // 950 ms spent + 200 ms of delay would start the next attempt after 1 s.
        assert_eq!(b.next_delay(Duration::from_millis(950)), None);
    }

    #[test]
    fn a_multiplier_of_one_is_a_constant_delay() {
        let mut b = Backoff::new(
            RetryPolicy {
                multiplier: 1.0,
                ..policy(Jitter::None)
            },
            0,
        );
        assert!(delays(&mut b, 5)
            .iter()
            .all(|d| *d == Duration::from_millis(100)));
    }
}
