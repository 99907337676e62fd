//! Batches that grow with the backlog. A loop polls at most [`MAX_BATCH`] records; a full
//! poll means more are waiting, so it takes what else is already there without waiting, up
//! to [`MAX_GROUP`], and handles it as one batch. An idle loop still handles each record as
//! soon as it arrives; a catching-up one pays its per-batch costs (a durable store commit, a
//! state commit and its changelog, one write per key and window) once per 16 000 records
//! instead of per 2 000.

use std::time::Duration;

use kontext_core::record::Record;
use kontext_log::{Consumer, LogError};
use tracing::debug;

/// Most records taken per poll.
pub(crate) const MAX_BATCH: usize = 2_000;
/// Most records gathered into one batch.
pub(crate) const MAX_GROUP: usize = 8 * MAX_BATCH;

/// After a full poll (`records`), takes what else is already there, up to [`MAX_GROUP`]
/// records, without waiting. A failed extra poll ends the gathering: what was gathered is
/// handled first, and the error is returned with it for the loop to raise at its next poll.
///
/// A rebalance is served inside a poll (Kafka), and a loop commits its batch after handling
/// it, as the group member it is at the end of the batch's last poll. So an extra poll that
/// took partitions away ends the gathering, and the records of those partitions are dropped
/// from the batch: their new owner reads them from the group's committed offset, and this
/// member must neither handle nor commit them.
pub(crate) async fn gather(
    consumer: &mut dyn Consumer,
    mut records: Vec<Record>,
) -> (Vec<Record>, Option<LogError>) {
    let mut last = records.len();
    if last < MAX_BATCH {
        return (records, None);
    }
    let assigned = consumer.assignment();
    while last == MAX_BATCH && records.len() + MAX_BATCH <= MAX_GROUP {
        let polled = consumer.poll(MAX_BATCH, Duration::ZERO).await;
        let now = consumer.assignment();
        let failed = match polled {
            Ok(more) => {
                last = more.len();
                records.extend(more);
                None
            }
            Err(e) => {
                debug!(error = %e, "extra poll failed; handling what was gathered first");
                Some(e)
            }
        };
        if now != assigned {
            let before = records.len();
            records.retain(|r| now.contains(&r.topic_partition()));
            debug!(
                dropped = before - records.len(),
                "the assignment changed while gathering a backlog; the batch keeps the records of the partitions still assigned"
            );
            return (records, failed);
        }
        if failed.is_some() {
            return (records, failed);
        }
    }
    (records, None)
}
