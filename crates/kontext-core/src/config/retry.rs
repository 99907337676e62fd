//! `retry:` and `limits:` in the pipeline file: how each stage retries transient failures, and
//! how large a record may be.
//!
//! ```yaml
//! retry:
//!   defaults:    { first_delay: 100ms, multiplier: 2, max_delay: 30s, jitter: equal }
//!   store_write: { max_attempts: 5, max_elapsed: 30s }   # then the record is dead-lettered
//!   store_probe: { max_delay: 5s }                        # the circuit breaker's probes
//!   dead_letter: { max_attempts: 8 }                      # then the sink stops
//! limits:
//!   max_record_bytes: 1048576
//!   max_event_time_ahead: 1h
//! ```
//!
//! Every field is optional. A stage's own field wins over `defaults`, which wins over the
//! stage's built-in value ([`RetryStage::builtin`]). `max_attempts: 0` and `max_elapsed: 0`
//! mean "no limit".

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest record (key + value + headers, in bytes) the pipeline processes by default: Kafka's
/// own default `max.message.bytes` (1 MiB) rounded down.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 1024 * 1024;
/// The longest delay between two attempts that a policy may ask for.
const MAX_DELAY_LIMIT: Duration = Duration::from_secs(3600);

/// Retry settings per stage. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Fields every stage takes unless it sets its own.
    #[serde(default)]
    pub defaults: RetrySettings,
    /// Writing a batch (or, after a split, one record) to the context store. Must be bounded:
    /// when a record's writes keep failing while the store accepts others, the record is
    /// dead-lettered once this budget is spent.
    #[serde(default)]
    pub store_write: RetrySettings,
    /// The circuit breaker's probes while the store is down. Unbounded by default: the sink
    /// waits for the store rather than lose or dead-letter anything.
    #[serde(default)]
    pub store_probe: RetrySettings,
    /// Writing dead letters. When the budget is spent the sink stops with an error rather
    /// than drop a record.
    #[serde(default)]
    pub dead_letter: RetrySettings,
}

/// One stage's retry fields, each optional (unset: inherited).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Delay before the second attempt (`100ms`).
    #[serde(
        default,
        with = "crate::duration::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub first_delay: Option<Duration>,
    /// Each delay is the previous one times this (`2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Delays never grow past this (`30s`).
    #[serde(
        default,
        with = "crate::duration::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_delay: Option<Duration>,
    /// How a delay is randomized: `equal` (default), `full` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
    /// Attempts in all, the first included; `0`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Time from the first attempt after which no new attempt starts; `0`: no limit.
    #[serde(
        default,
        with = "crate::duration::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_elapsed: Option<Duration>,
}

/// How a computed delay `d` is randomized, so that many clients failing together do not retry
/// in lockstep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Uniform in `[d/2, d]`: spread out, yet never much shorter than asked.
    #[default]
    Equal,
    /// Uniform in `[0, d]` (AWS's "full jitter"): the widest spread.
    Full,
    /// Exactly `d`.
    None,
}

/// A stage that retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryStage {
    /// See [`RetryConfig::store_write`].
    StoreWrite,
    /// See [`RetryConfig::store_probe`].
    StoreProbe,
    /// See [`RetryConfig::dead_letter`].
    DeadLetter,
}

impl RetryStage {
    /// Every stage, in file order.
    pub const ALL: [RetryStage; 3] = [
        RetryStage::StoreWrite,
        RetryStage::StoreProbe,
        RetryStage::DeadLetter,
    ];

    /// The stage's name in the pipeline file and in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            RetryStage::StoreWrite => "store_write",
            RetryStage::StoreProbe => "store_probe",
            RetryStage::DeadLetter => "dead_letter",
        }
    }

    /// The stage's policy when the pipeline file says nothing: 100 ms doubling to 30 s with
    /// equal jitter; store writes give up after 5 attempts or 30 s, dead-letter writes after
    /// 8 attempts, store probes never.
    pub fn builtin(self) -> RetryPolicy {
        let base = RetryPolicy {
            first_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: Jitter::Equal,
            max_attempts: None,
            max_elapsed: None,
        };
        match self {
            RetryStage::StoreWrite => RetryPolicy {
                max_attempts: Some(5),
                max_elapsed: Some(Duration::from_secs(30)),
                ..base
            },
            RetryStage::StoreProbe => base,
            RetryStage::DeadLetter => RetryPolicy {
                max_attempts: Some(8),
                ..base
            },
        }
    }
}

impl fmt::Display for RetryStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A resolved retry policy: every field known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub first_delay: Duration,
    /// Growth factor of the delay, at least 1.
    pub multiplier: f64,
    /// Cap of the delay.
    pub max_delay: Duration,
    /// Randomization of each delay.
    pub jitter: Jitter,
    /// Attempts in all; `None`: unlimited.
    pub max_attempts: Option<u32>,
    /// No attempt starts later than this after the first; `None`: unlimited.
    pub max_elapsed: Option<Duration>,
}

impl RetryPolicy {
    /// Whether the policy ever gives up.
    pub fn is_bounded(&self) -> bool {
        self.max_attempts.is_some() || self.max_elapsed.is_some()
    }
}

impl RetryConfig {
    /// The policy of `stage`: its own fields, then `defaults`, then the built-in values.
    pub fn policy(&self, stage: RetryStage) -> RetryPolicy {
        let own = self.settings(stage);
        let pick = |f: fn(&RetrySettings) -> Option<Duration>| f(own).or(f(&self.defaults));
        let builtin = stage.builtin();
        let limit = |v: Option<u32>| v.map(|n| (n > 0).then_some(n));
        let elapsed = |v: Option<Duration>| v.map(|d| (!d.is_zero()).then_some(d));
        RetryPolicy {
            first_delay: pick(|s| s.first_delay).unwrap_or(builtin.first_delay),
            multiplier: own
                .multiplier
                .or(self.defaults.multiplier)
                .unwrap_or(builtin.multiplier),
            max_delay: pick(|s| s.max_delay).unwrap_or(builtin.max_delay),
            jitter: own
                .jitter
                .or(self.defaults.jitter)
                .unwrap_or(builtin.jitter),
            max_attempts: limit(own.max_attempts.or(self.defaults.max_attempts))
                .unwrap_or(builtin.max_attempts),
            max_elapsed: elapsed(pick(|s| s.max_elapsed)).unwrap_or(builtin.max_elapsed),
        }
    }

    /// The delays of waiting for a dependency that must come back (the log or PostgreSQL at
    /// start-up, the processor's and the sinks' polls, the processor's produces, a consumer
    /// group to rewind): `defaults`'
    /// delays and jitter over the built-in ones, with no limit, since giving up would stop
    /// the pipeline for an outage it should ride out (Ctrl-C still stops the wait).
    pub fn waiting_policy(&self) -> RetryPolicy {
        let base = RetryStage::StoreProbe.builtin();
        let d = &self.defaults;
        RetryPolicy {
            first_delay: d.first_delay.unwrap_or(base.first_delay),
            multiplier: d.multiplier.unwrap_or(base.multiplier),
            max_delay: d.max_delay.unwrap_or(base.max_delay),
            jitter: d.jitter.unwrap_or(base.jitter),
            max_attempts: None,
            max_elapsed: None,
        }
    }

    /// One stage's own settings.
    pub fn settings(&self, stage: RetryStage) -> &RetrySettings {
        match stage {
            RetryStage::StoreWrite => &self.store_write,
            RetryStage::StoreProbe => &self.store_probe,
            RetryStage::DeadLetter => &self.dead_letter,
        }
    }

    /// Reports every problem through `err(field, message)`.
    pub(crate) fn validate(&self, err: &mut impl FnMut(String, String)) {
        let sections = [("defaults", &self.defaults)]
            .into_iter()
            .chain(RetryStage::ALL.map(|s| (s.name(), self.settings(s))));
        for (name, s) in sections {
            let at = |field: &str| format!("retry.{name}.{field}");
            if s.first_delay.is_some_and(|d| d.is_zero()) {
                err(
                    at("first_delay"),
                    "must be greater than zero, e.g. 100ms".into(),
                );
            }
            if let Some(m) = s.multiplier {
                if !(1.0..=100.0).contains(&m) {
                    err(
                        at("multiplier"),
                        format!("{m} is out of range: use 1 (constant delay) to 100, e.g. 2"),
                    );
                }
            }
            if let Some(d) = s.max_delay {
                if d < Duration::from_millis(1) || d > MAX_DELAY_LIMIT {
                    err(
                        at("max_delay"),
                        format!("{d:?} is out of range: use 1ms to 1h, e.g. 30s"),
                    );
                }
            }
        }
        // Named where the values were written: a stage that sets neither delay takes both from
        // `defaults` (or the built-in values), and one error about `defaults` says it once.
        let mut defaults_named = false;
        for stage in RetryStage::ALL {
            let p = self.policy(stage);
            if p.first_delay > p.max_delay {
                let own = self.settings(stage);
                let at = if own.first_delay.is_some() || own.max_delay.is_some() {
                    format!("retry.{stage}.first_delay")
                } else if std::mem::replace(&mut defaults_named, true) {
                    continue;
                } else {
                    "retry.defaults.first_delay".to_string()
                };
                err(
                    at,
                    format!(
                        "{:?} is longer than max_delay {:?}: lower first_delay or raise max_delay",
                        p.first_delay, p.max_delay
                    ),
                );
            }
        }
        if !self.policy(RetryStage::StoreWrite).is_bounded() {
            err(
                "retry.store_write.max_attempts".into(),
                "store writes must give up so that one bad record cannot block its partition: \
                 set max_attempts (e.g. 5) or max_elapsed (e.g. 30s) above 0"
                    .into(),
            );
        }
    }
}

/// Limits on what a record may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Records larger than this (key + value + header names and values, in bytes) are not
    /// processed: they are dead-lettered with the error kind `record_too_large`.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
    /// Events whose time is more than this after their record's timestamp are not processed:
    /// they are dead-lettered with the error kind `time_ahead` (Kafka's
    /// `message.timestamp.after.max.ms` for event time). `0`: no limit.
    #[serde(default = "default_max_event_time_ahead", with = "crate::duration")]
    pub max_event_time_ahead: Duration,
}

fn default_max_record_bytes() -> u64 {
    DEFAULT_MAX_RECORD_BYTES
}

/// [`LimitsConfig::max_event_time_ahead`]'s default: one hour, as Kafka's
/// `message.timestamp.after.max.ms`.
pub const DEFAULT_MAX_EVENT_TIME_AHEAD: Duration = Duration::from_secs(3600);

fn default_max_event_time_ahead() -> Duration {
    DEFAULT_MAX_EVENT_TIME_AHEAD
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            max_event_time_ahead: DEFAULT_MAX_EVENT_TIME_AHEAD,
        }
    }
}

impl LimitsConfig {
    /// [`LimitsConfig::max_event_time_ahead`] in milliseconds, `0` for no limit.
    pub fn max_event_time_ahead_ms(&self) -> i64 {
        i64::try_from(self.max_event_time_ahead.as_millis()).unwrap_or(i64::MAX)
    }

    /// Reports every problem through `err(field, message)`.
    pub(crate) fn validate(&self, err: &mut impl FnMut(String, String)) {
        if self.max_record_bytes == 0 {
            err(
                "limits.max_record_bytes".into(),
                "must be at least 1 byte, e.g. 1048576 (1 MiB)".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests;
