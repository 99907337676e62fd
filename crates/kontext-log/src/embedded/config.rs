//! Settings of the embedded log.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::LogError;

/// When an append is acknowledged relative to `fsync`. The acknowledgement is also the point
/// at which consumers can see the records: the embedded log never hands out a record that a
/// crash could take back under the chosen policy.
///
/// In YAML or JSON: `always`, `never` (alias `os_managed`), `group_commit` (default interval),
/// or `{ group_commit: { interval: 2ms } }` (a plain map, not a YAML `!tag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawFsync", into = "RawFsync")]
pub enum FsyncPolicy {
    /// Every send call writes its records and fsyncs the partition's files before it returns,
    /// one fsync per call and partition, serialized per partition. Survives power loss and
    /// kernel crashes for every acknowledged record. The slowest policy: throughput is bounded
    /// by fsync latency unless calls carry large batches.
    Always,
    /// The default. Sends append to the page cache and wait; a background syncer fsyncs every
    /// partition with pending appends and then acknowledges all of them at once, so one fsync
    /// serves every send (and every record of a batched send) that was written before it
    /// started. Guarantees the same as [`FsyncPolicy::Always`] for acknowledged records.
    /// `interval` is the minimum spacing between two fsyncs of the syncer: a lone send is
    /// synced at once, while under load appends coalesce for up to `interval` (bounding the
    /// fsync rate). Appends that arrive while an fsync runs are covered by the next one.
    GroupCommit { interval: Duration },
    /// Acknowledge after the write to the page cache, never fsync on the append path (the OS
    /// writes back on its own schedule; a rolled segment is fsynced in the background soon
    /// after the roll, and every partition on a clean close). Like
    /// Kafka's default: acknowledged records survive a crash of the process (kill -9) but not
    /// of the machine; after a power loss recovery keeps the longest valid prefix.
    Never,
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::GroupCommit {
            interval: default_group_commit_interval(),
        }
    }
}

/// The serialized forms of [`FsyncPolicy`]: a bare name, or a map for group commit with
/// settings. Written by hand because serde's externally tagged enums become YAML `!tags`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RawFsync {
    Name(String),
    GroupCommit { group_commit: GroupCommitSettings },
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupCommitSettings {
    #[serde(
        with = "kontext_core::duration",
        default = "default_group_commit_interval"
    )]
    interval: Duration,
}

fn default_group_commit_interval() -> Duration {
    Duration::from_millis(1)
}

impl TryFrom<RawFsync> for FsyncPolicy {
    type Error = String;

    fn try_from(raw: RawFsync) -> Result<Self, String> {
        match raw {
            RawFsync::GroupCommit { group_commit } => Ok(FsyncPolicy::GroupCommit {
                interval: group_commit.interval,
            }),
            RawFsync::Name(name) => match name.as_str() {
                "always" => Ok(FsyncPolicy::Always),
                "never" | "os_managed" => Ok(FsyncPolicy::Never),
                "group_commit" => Ok(FsyncPolicy::default()),
                other => Err(format!(
                    "unknown fsync policy {other:?}: expected always, group_commit or never"
                )),
            },
        }
    }
}

impl From<FsyncPolicy> for RawFsync {
    fn from(p: FsyncPolicy) -> Self {
        match p {
            FsyncPolicy::Always => RawFsync::Name("always".into()),
            FsyncPolicy::Never => RawFsync::Name("never".into()),
            FsyncPolicy::GroupCommit { interval } => RawFsync::GroupCommit {
                group_commit: GroupCommitSettings { interval },
            },
        }
    }
}

/// Settings of an [`super::EmbeddedLog`]. Every field has a default, so `{}` is a valid config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// When appends are acknowledged. Default: group commit with a 1 ms interval.
    pub fsync: FsyncPolicy,
    /// A partition's active segment is rolled once it reaches this size. Default 128 MiB.
    pub segment_bytes: u64,
    /// The largest record accepted, measured as its encoded frame (key, value, headers and
    /// 36 bytes of framing). Default 1 048 588 bytes, Kafka's `message.max.bytes`.
    pub max_record_bytes: usize,
    /// One sparse-index entry per this many bytes of segment, so a fetch scans at most this
    /// much before reaching its offset. Default 4 KiB.
    pub index_interval_bytes: u32,
    /// How often the background thread applies retention. Default 5 minutes (Kafka's
    /// `log.retention.check.interval.ms`). Retention also runs when a segment rolls.
    #[serde(with = "kontext_core::duration")]
    pub retention_check_interval: Duration,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::default(),
            segment_bytes: 128 * 1024 * 1024,
            max_record_bytes: 1_048_588,
            index_interval_bytes: 4096,
            retention_check_interval: Duration::from_secs(300),
        }
    }
}

impl EmbeddedConfig {
    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), LogError> {
        let mut problems = Vec::new();
        if self.segment_bytes < 1024 {
            problems.push(format!(
                "segment_bytes must be at least 1024, got {}",
                self.segment_bytes
            ));
        }
        // Positions in a segment are kept as u32 in the sparse index.
        if self.segment_bytes > u32::MAX as u64 / 2 {
            problems.push(format!(
                "segment_bytes must be at most 2 GiB, got {}",
                self.segment_bytes
            ));
        }
        if self.max_record_bytes < 64 || self.max_record_bytes > i32::MAX as usize / 2 {
            problems.push(format!(
                "max_record_bytes must be between 64 and 1 GiB, got {}",
                self.max_record_bytes
            ));
        }
        if self.index_interval_bytes == 0 {
            problems.push("index_interval_bytes must be positive".to_string());
        }
        if self.retention_check_interval.is_zero() {
            problems.push("retention_check_interval must be positive".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LogError::Invalid(format!(
                "embedded log config: {}",
                problems.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_reads_snake_case() {
        let p: FsyncPolicy = serde_json::from_str(r#""always""#).expect("always");
        assert_eq!(p, FsyncPolicy::Always);
        let p: FsyncPolicy = serde_json::from_str(r#""os_managed""#).expect("alias");
        assert_eq!(p, FsyncPolicy::Never);
        let p: FsyncPolicy =
            serde_json::from_str(r#"{"group_commit":{"interval":"5ms"}}"#).expect("group commit");
        assert_eq!(
            p,
            FsyncPolicy::GroupCommit {
                interval: Duration::from_millis(5)
            }
        );
        let p: FsyncPolicy =
            serde_json::from_str(r#"{"group_commit":{"interval":250}}"#).expect("ms");
        assert_eq!(
            p,
            FsyncPolicy::GroupCommit {
                interval: Duration::from_millis(250)
            }
        );
    }

    #[test]
    fn fsync_policy_reads_from_yaml() {
        let c: EmbeddedConfig =
            serde_yaml_ng::from_str("fsync: always\nsegment_bytes: 65536\n").expect("always");
        assert_eq!((c.fsync, c.segment_bytes), (FsyncPolicy::Always, 65536));
        let c: EmbeddedConfig =
            serde_yaml_ng::from_str("fsync:\n  group_commit:\n    interval: 2ms\n").expect("gc");
        assert_eq!(
            c.fsync,
            FsyncPolicy::GroupCommit {
                interval: Duration::from_millis(2)
            }
        );
        let c: EmbeddedConfig = serde_yaml_ng::from_str("fsync: os_managed\n").expect("never");
        assert_eq!(c.fsync, FsyncPolicy::Never);
        let c: EmbeddedConfig = serde_yaml_ng::from_str("fsync: group_commit\n").expect("name");
        assert_eq!(c.fsync, FsyncPolicy::default());
        let err = serde_yaml_ng::from_str::<EmbeddedConfig>("fsync: sometimes\n").expect_err("bad");
        assert!(err.to_string().contains("unknown fsync policy"), "{err}");
        let yaml = serde_yaml_ng::to_string(&EmbeddedConfig::default()).expect("to yaml");
        let back: EmbeddedConfig = serde_yaml_ng::from_str(&yaml).expect("round trip");
        assert_eq!(back, EmbeddedConfig::default());
    }

    #[test]
    fn config_defaults_fill_missing_fields_and_unknown_fields_are_rejected() {
        let c: EmbeddedConfig = serde_json::from_str(r#"{"segment_bytes": 4096}"#).expect("parses");
        assert_eq!(c.segment_bytes, 4096);
        assert_eq!(c.fsync, FsyncPolicy::default());
        assert!(serde_json::from_str::<EmbeddedConfig>(r#"{"segment_byte": 1}"#).is_err());
        let round = serde_json::to_string(&EmbeddedConfig::default()).expect("serializes");
        let back: EmbeddedConfig = serde_json::from_str(&round).expect("round trip");
        assert_eq!(back, EmbeddedConfig::default());
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = EmbeddedConfig {
            segment_bytes: 1,
            index_interval_bytes: 0,
            ..Default::default()
        };
        let msg = c.validate().expect_err("invalid").to_string();
        assert!(
            msg.contains("segment_bytes") && msg.contains("index_interval_bytes"),
            "{msg}"
        );
    }

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(
            kontext_core::duration::parse("250us"),
            Ok(Duration::from_micros(250))
        );
        assert_eq!(
            kontext_core::duration::parse("2s"),
            Ok(Duration::from_secs(2))
        );
        assert!(kontext_core::duration::parse("2 fortnights").is_err());
    }
}
