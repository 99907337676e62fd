//! Model-based test: random appends, reopens and fetches against a naive in-memory model.

mod common;

use std::time::Duration;

use bytes::Bytes;
use kontext_core::record::{Header, ProduceRecord};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog, FsyncPolicy};
use kontext_log::{Log, LogError, TopicSpec};
use proptest::prelude::*;

const PARTITIONS: i32 = 3;

#[derive(Debug, Clone)]
struct Rec {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    header: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        partition: i32,
        records: Vec<Rec>,
    },
    Reopen,
    /// `from` is taken modulo (partition length + 2), so it can point past the end.
    Fetch {
        partition: i32,
        from: usize,
        max: usize,
    },
}

fn rec() -> impl Strategy<Value = Rec> {
    (
        proptest::option::weighted(0.5, proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::option::weighted(0.9, proptest::collection::vec(any::<u8>(), 0..400)),
        proptest::option::weighted(0.3, proptest::collection::vec(any::<u8>(), 0..8)),
    )
        .prop_map(|(key, value, header)| Rec { key, value, header })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PARTITIONS, proptest::collection::vec(rec(), 1..12))
            .prop_map(|(partition, records)| Op::Append { partition, records }),
        1 => Just(Op::Reopen),
        3 => (0..PARTITIONS, any::<usize>(), 1usize..40).prop_map(|(partition, from, max)| Op::Fetch { partition, from, max }),
    ]
}

fn policy() -> impl Strategy<Value = FsyncPolicy> {
    prop_oneof![
        Just(FsyncPolicy::Never),
        Just(FsyncPolicy::Always),
        Just(FsyncPolicy::GroupCommit {
            interval: Duration::ZERO
        }),
    ]
}

fn to_produce(partition: i32, r: &Rec) -> ProduceRecord {
    ProduceRecord {
        topic: "m".into(),
        partition: Some(partition),
        key: r.key.clone().map(Bytes::from),
        value: r.value.clone().map(Bytes::from),
        headers: r
            .header
            .iter()
            .map(|h| Header {
                key: "h".into(),
                value: Some(Bytes::from(h.clone())),
            })
            .collect(),
        timestamp_ms: Some(1_000 + partition as i64),
    }
}

fn run(policy: FsyncPolicy, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedConfig {
            fsync: policy,
            segment_bytes: 1024,
            index_interval_bytes: 64,
            ..Default::default()
        };
        let mut log = EmbeddedLog::open(dir.path(), config.clone()).expect("open");
        log.create_topic(&TopicSpec::new("m", PARTITIONS))
            .await
            .expect("create");
        let mut model: Vec<Vec<Rec>> = vec![Vec::new(); PARTITIONS as usize];
        for op in ops {
            match op {
                Op::Append { partition, records } => {
                    let producer = log.producer().await.expect("producer");
                    let batch = records.iter().map(|r| to_produce(partition, r)).collect();
                    let positions = producer.send(batch).await.expect("send");
                    let part = &mut model[partition as usize];
                    for (k, pos) in positions.iter().enumerate() {
                        prop_assert_eq!(pos.partition, partition);
                        prop_assert_eq!(pos.offset, (part.len() + k) as i64, "dense offsets");
                    }
                    part.extend(records);
                }
                Op::Reopen => {
                    drop(log);
                    log = EmbeddedLog::open(dir.path(), config.clone()).expect("reopen");
                    let d = log.describe_topic("m").await.expect("describe");
                    for p in &d.partitions {
                        prop_assert_eq!(p.high_watermark, model[p.partition as usize].len() as i64);
                        prop_assert_eq!(p.low_watermark, 0);
                    }
                }
                Op::Fetch {
                    partition,
                    from,
                    max,
                } => {
                    let part = &model[partition as usize];
                    let from = from % (part.len() + 2);
                    match log.fetch("m", partition, from as i64, max) {
                        Ok(got) => {
                            prop_assert!(from <= part.len());
                            let expected = &part[from..(from + max).min(part.len())];
                            prop_assert_eq!(got.len(), expected.len());
                            for (k, (g, e)) in got.iter().zip(expected).enumerate() {
                                prop_assert_eq!(g.offset, (from + k) as i64);
                                prop_assert_eq!(g.partition, partition);
                                prop_assert_eq!(g.timestamp_ms, 1_000 + partition as i64);
                                prop_assert_eq!(g.key.as_deref(), e.key.as_deref());
                                prop_assert_eq!(g.value.as_deref(), e.value.as_deref());
                                prop_assert_eq!(g.header("h"), e.header.as_deref());
                            }
                        }
                        Err(LogError::OffsetOutOfRange { high, .. }) => {
                            prop_assert!(from > part.len());
                            prop_assert_eq!(high, part.len() as i64);
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("fetch failed: {e}"))),
                    }
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn embedded_log_matches_a_vec_model(policy in policy(), ops in proptest::collection::vec(op(), 1..60)) {
        run(policy, ops)?;
    }
}
