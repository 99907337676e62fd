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
pub(crate) async fn gather(
    consumer: &mut dyn Consumer,
    mut records: Vec<Record>,
) -> (Vec<Record>, Option<LogError>) {
    let mut last = records.len();
    while last == MAX_BATCH && records.len() + MAX_BATCH <= MAX_GROUP {
        match consumer.poll(MAX_BATCH, Duration::ZERO).await {
            Ok(more) => {
                last = more.len();
                records.extend(more);
            }
            Err(e) => {
                debug!(error = %e, "extra poll failed; handling what was gathered first");
                return (records, Some(e));
            }
        }
    }
    (records, None)
}
