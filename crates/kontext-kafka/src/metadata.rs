//! Cluster metadata: which topics exist, their partitions and watermarks, and the partition
//! counts the producer routes keys with.
//!
//! librdkafka's metadata and watermark calls block the calling thread until the broker
//! answers, so every call here runs on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext_log::{LogError, PartitionInfo};
use parking_lot::Mutex;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;

use crate::error::{code_error, log_error};

/// The metadata client's context: logs as librdkafka's default does, and keeps the latest
/// handshake the cluster refused, from librdkafka's `FAIL` log lines: "SASL authentication
/// error: <the broker's reason>" for credentials; for TLS, a broker certificate this client
/// does not trust ("certificate verify failed") or a TLS alert the broker sent about
/// certificates or the handshake ("SSL alert number 42": it refuses the client's certificate
/// or its absence; [`REFUSING_ALERTS`]). The wording is librdkafka's and OpenSSL's, pinned by
/// the bundled versions; the end-to-end tests `a_wrong_password_stops_the_pipeline_and_says_why`
/// and `an_untrusted_broker_certificate_stops_the_pipeline_and_says_why` fail if it changes.
/// A refusal counts for [`REFUSAL_MEMORY`] after it was logged: a single one during a rolling
/// restart or a certificate rotation must not explain an outage days later.
#[derive(Default)]
pub(crate) struct WatchContext {
    refused: Mutex<Option<(Instant, Refusal)>>,
}

/// How long a logged refusal counts. librdkafka logs a repeated failure at most every 30 s
/// per broker; a refusal that persists is logged again well within this.
const REFUSAL_MEMORY: Duration = Duration::from_secs(90);

/// The TLS alerts (RFC 8446, 6.2) by which a broker refuses a handshake for its settings:
/// handshake_failure, bad_certificate, unsupported_certificate, certificate_revoked,
/// certificate_expired, certificate_unknown, unknown_ca, certificate_required. Others
/// (internal_error, user_canceled ...) may come from a broker going down.
const REFUSING_ALERTS: [u32; 8] = [40, 42, 43, 44, 45, 46, 48, 116];

/// A handshake the cluster refused, which retrying will not change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The SASL handshake: the broker's reason.
    Credentials(String),
    /// The SASL mechanism handshake: the broker does not enable `sasl.mechanism`; its reason
    /// and the mechanisms it does.
    Mechanism(String),
    /// The TLS handshake: OpenSSL's reason.
    Tls(String),
}

impl Refusal {
    /// What to tell the user instead of `e`, the timeout the refusal caused.
    pub(crate) fn explain(&self, e: &LogError) -> String {
        match self {
            Refusal::Credentials(reason) => format!(
                "the cluster refuses the credentials ({reason}): check `security.protocol`, \
                 `sasl.mechanism`, `sasl.username` and `sasl.password` in the log's \
                 properties; {e}"
            ),
            Refusal::Mechanism(reason) => format!(
                "the cluster does not accept the SASL mechanism ({reason}): set \
                 `sasl.mechanism` in the log's properties to one the brokers list; {e}"
            ),
            Refusal::Tls(reason) => format!(
                "the TLS handshake with the cluster fails ({reason}): check `ssl.ca.location` \
                 (the authority that signed the brokers' certificates), that \
                 `bootstrap_servers` names the brokers as their certificates do, and \
                 `ssl.certificate.location` and `ssl.key.location` (the client certificate \
                 the brokers may require) in the log's properties; {e}"
            ),
        }
    }

    /// The refusal a librdkafka `FAIL` log line reports, if any. A connection lost during a
    /// handshake (librdkafka's own errors read "Local: ...", e.g. "SaslAuthenticateRequest
    /// failed: Local: Broker transport failure"; TLS reads "unexpected eof") is an outage,
    /// which retrying fixes, and is none.
    fn of_failure(line: &str) -> Option<Refusal> {
        if let Some((_, reason)) = line.split_once("SASL authentication error: ") {
            return (!reason.contains("Local: ")).then(|| Refusal::Credentials(reason.into()));
        }
        // "SASL PLAIN mechanism handshake failed: Broker: Unsupported SASL mechanism: broker's
        // supported mechanisms: SCRAM-SHA-256,SCRAM-SHA-512" (rdkafka_broker.c).
        if let Some((before, rest)) = line.split_once(" mechanism handshake failed: ") {
            let mechanism = before.rsplit_once("SASL ").map_or(before, |(_, m)| m);
            return (!rest.contains("Local: "))
                .then(|| Refusal::Mechanism(format!("{mechanism}: {rest}")));
        }
        let alert = line
            .split_once("SSL alert number ")
            .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok());
        if line.contains("certificate verify failed")
            || alert.is_some_and(|n| REFUSING_ALERTS.contains(&n))
        {
            let reason = line
                .split_once(": SSL handshake failed: ")
                .or_else(|| line.split_once(": Receive failed: "))
                .map_or(line, |(_, reason)| reason);
            return Some(Refusal::Tls(reason.into()));
        }
        None
    }
}

impl ClientContext for WatchContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "FAIL" {
            if let Some(refusal) = Refusal::of_failure(log_message) {
                *self.refused.lock() = Some((Instant::now(), refusal));
            }
        }
        DefaultClientContext.log(level, fac, log_message);
    }
}

impl ConsumerContext for WatchContext {}

/// The refusal `refused` holds at `now`, forgetting it once a fetch succeeded or
/// [`REFUSAL_MEMORY`] passed since it was logged.
fn current(
    refused: &mut Option<(Instant, Refusal)>,
    fetched: bool,
    now: Instant,
) -> Option<Refusal> {
    if fetched
        || refused
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) > REFUSAL_MEMORY)
    {
        *refused = None;
    }
    refused.as_ref().map(|(_, refusal)| refusal.clone())
}

/// A group-less consumer used only for metadata and watermark requests (a consumer, not an
/// admin client, because librdkafka offers `query_watermark_offsets` on consumers).
pub(crate) struct MetadataClient {
    client: Arc<BaseConsumer<WatchContext>>,
    timeout: Duration,
}

impl MetadataClient {
    pub(crate) fn new(client: BaseConsumer<WatchContext>, timeout: Duration) -> Self {
        Self {
            client: Arc::new(client),
            timeout,
        }
    }

    /// Whether the cluster refuses this client's credentials or TLS handshake, and why: asks it
    /// for its brokers (waiting at most `timeout`), then serves the client's pending events.
    /// The calls just time out when a handshake fails; librdkafka says why only in a `FAIL` log event
    /// (its error event does not reach a consumer's poll), at most every 30 s per broker,
    /// which serving the events hands to [`WatchContext`]. A refusal counts until a fetch
    /// succeeds, for [`REFUSAL_MEMORY`] at most.
    pub(crate) async fn refused_handshake(&self, timeout: Duration) -> Option<Refusal> {
        let client = self.client.clone();
        blocking(move || {
            let fetched = client.fetch_metadata(None, timeout).is_ok();
            // A consumer without an assignment returns only events; a few are enough.
            for _ in 0..16 {
                if client.poll(Duration::ZERO).is_none() {
                    break;
                }
            }
            Ok(current(
                &mut client.context().refused.lock(),
                fetched,
                Instant::now(),
            ))
        })
        .await
        .ok()
        .flatten()
    }

    /// The members of consumer group `group` now (0 when it has none or does not exist).
    pub(crate) async fn group_members(&self, group: &str) -> Result<usize, LogError> {
        let client = self.client.clone();
        let (group, timeout) = (group.to_string(), self.timeout);
        blocking(move || {
            let list = client
                .fetch_group_list(Some(&group), timeout)
                .map_err(|e| log_error(&format!("describing group {group:?}"), e))?;
            Ok(list
                .groups()
                .iter()
                .filter(|g| g.name() == group)
                .map(|g| g.members().len())
                .sum())
        })
        .await
    }

    /// Every topic with its partition ids, sorted by partition.
    pub(crate) async fn topics(&self) -> Result<Vec<(String, Vec<i32>)>, LogError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        blocking(move || {
            let metadata = client
                .fetch_metadata(None, timeout)
                .map_err(|e| log_error("fetching metadata", e))?;
            Ok(metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), sorted_partitions(t)))
                .collect())
        })
        .await
    }

    /// The partition ids of `topic`, sorted, or `None` if the topic does not exist.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<Option<Vec<i32>>, LogError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let topic = topic.to_string();
        blocking(move || {
            let metadata = client
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| log_error(&format!("fetching metadata of {topic:?}"), e))?;
            let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Ok(None);
            };
            match found.error().map(RDKafkaErrorCode::from) {
                None => Ok(Some(sorted_partitions(found))),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(None),
                // Shortly after creation a topic may have no leader yet.
                Some(code) => Err(code_error(&format!("metadata of {topic:?}"), code)),
            }
        })
        .await
    }

    /// Low and high watermarks of each partition, asked of the partitions' leaders.
    pub(crate) async fn watermarks(
        &self,
        topic: &str,
        partitions: Vec<i32>,
    ) -> Result<Vec<PartitionInfo>, LogError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let topic = topic.to_string();
        blocking(move || {
            partitions
                .into_iter()
                .map(|partition| {
                    let (low, high) = client
                        .fetch_watermarks(&topic, partition, timeout)
                        .map_err(|e| {
                            log_error(&format!("fetching watermarks of {topic}/{partition}"), e)
                        })?;
                    Ok(PartitionInfo {
                        partition,
                        low_watermark: low,
                        high_watermark: high,
                    })
                })
                .collect()
        })
        .await
    }
}

/// Partition counts of topics, as the producer needs them to route keys. An entry is trusted
/// for `max_age` and dropped early when a send reports that the topology changed.
pub(crate) struct PartitionCounts {
    metadata: Arc<MetadataClient>,
    max_age: Duration,
    counts: Mutex<HashMap<String, (i32, Instant)>>,
}

impl PartitionCounts {
    pub(crate) fn new(metadata: Arc<MetadataClient>, max_age: Duration) -> Self {
        Self {
            metadata,
            max_age,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// The number of partitions of `topic`, from the cache or from the cluster.
    pub(crate) async fn count(&self, topic: &str) -> Result<i32, LogError> {
        if let Some(&(count, fetched)) = self.counts.lock().get(topic) {
            if fetched.elapsed() < self.max_age {
                return Ok(count);
            }
        }
        let partitions = self
            .metadata
            .partitions(topic)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
        let count = i32::try_from(partitions.len()).unwrap_or(i32::MAX);
        if count == 0 {
            // Metadata without partitions: a topic in creation. Not cached, so the next send
            // asks again; transient, because waiting helps.
            return Err(LogError::Kafka {
                message: format!("topic {topic:?} has no partitions in the metadata yet"),
                transient: true,
            });
        }
        self.counts
            .lock()
            .insert(topic.to_string(), (count, Instant::now()));
        Ok(count)
    }

    /// Forgets the count of `topic`, so that the next send fetches it again.
    pub(crate) fn invalidate(&self, topic: &str) {
        self.counts.lock().remove(topic);
    }
}

/// Runs a blocking librdkafka call on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, LogError>
where
    F: FnOnce() -> Result<T, LogError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        // The closure panicked or the runtime is shutting down: the call's outcome is unknown.
        Err(join) if join.is_cancelled() => Err(LogError::Closed),
        Err(join) => Err(LogError::Kafka {
            message: format!("blocking Kafka call failed: {join}"),
            transient: false,
        }),
    }
}

/// Drops a librdkafka client whose close blocks (a consumer leaving its group, a producer
/// collecting the delivery reports of the records it purges). On a multi-threaded runtime the wait is announced to tokio
/// (`block_in_place`) so other tasks move off this thread; on a current-thread runtime (where
/// that is not allowed) or outside one it simply blocks.
pub(crate) fn drop_blocking<T>(client: T) {
    let in_multi_thread_runtime = tokio::runtime::Handle::try_current()
        .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .unwrap_or(false);
    if in_multi_thread_runtime {
        tokio::task::block_in_place(move || drop(client));
    } else {
        drop(client);
    }
}

fn sorted_partitions(topic: &rdkafka::metadata::MetadataTopic) -> Vec<i32> {
    let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal by the broker is kept; a connection lost during the handshake (an outage,
    /// which retrying fixes) and other failures are not.
    #[test]
    fn only_a_refused_handshake_counts_as_refused() {
        let context = WatchContext::default();
        for line in [
            "sasl_plaintext://b:9094/bootstrap: SASL authentication error: SaslAuthenticateRequest failed: Local: Broker transport failure (after 0ms in state DOWN)",
            "sasl_plaintext://b:9094/bootstrap: Connect to ipv4#127.0.0.1:9094 failed: Connection refused",
            "ssl://localhost:9095/bootstrap: Receive failed: error:0A000126:SSL routines::unexpected eof while reading (after 3ms in state UP)",
            // A broker going down mid-handshake: internal_error, not a refusal.
            "ssl://localhost:9095/bootstrap: SSL handshake failed: error:0A000438:SSL routines::tlsv1 alert internal error: SSL alert number 80 (after 2ms in state SSL_HANDSHAKE)",
        ] {
            context.log(RDKafkaLogLevel::Error, "FAIL", line);
        }
        assert_eq!(*context.refused.lock(), None);
        context.log(RDKafkaLogLevel::Error, "FAIL", "sasl_plaintext://b:9094/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 320ms in state AUTH_REQ)");
        let refused = context.refused.lock().clone().map(|(_, r)| r);
        match refused {
            Some(Refusal::Credentials(reason)) => {
                assert!(reason.starts_with("Authentication failed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A broker that does not enable the configured SASL mechanism refuses it for good; a
    /// connection lost during that handshake is an outage.
    #[test]
    fn an_unsupported_sasl_mechanism_is_a_refusal() {
        let line = "sasl_plaintext://127.0.0.1:9094/bootstrap: SASL PLAIN mechanism handshake failed: Broker: Unsupported SASL mechanism: broker's supported mechanisms: SCRAM-SHA-256,SCRAM-SHA-512 (after 3ms in state AUTH_HANDSHAKE)";
        let Some(refusal @ Refusal::Mechanism(_)) = Refusal::of_failure(line) else {
            panic!("not a mechanism refusal: {line}");
        };
        let message = refusal.explain(&LogError::Kafka {
            message: "timed out".into(),
            transient: true,
        });
        assert!(
            message.contains("(PLAIN: Broker: Unsupported SASL mechanism")
                && message.contains("SCRAM-SHA-256,SCRAM-SHA-512")
                && message.contains("`sasl.mechanism`"),
            "{message}"
        );
        let lost = "sasl_plaintext://127.0.0.1:9094/bootstrap: SASL PLAIN mechanism handshake failed: Local: Broker transport failure: broker's supported mechanisms:  (after 1ms in state AUTH_HANDSHAKE)";
        assert_eq!(Refusal::of_failure(lost), None);
    }

    /// A refusal explains failures until a fetch succeeds, and for a while only.
    #[test]
    fn a_refusal_is_forgotten_after_a_fetch_or_after_a_while() {
        let at = Instant::now();
        let refusal = Refusal::Tls("bad certificate".into());
        let mut refused = Some((at, refusal.clone()));
        assert_eq!(
            current(&mut refused, false, at + Duration::from_secs(60)),
            Some(refusal.clone())
        );
        assert_eq!(
            current(
                &mut refused,
                false,
                at + REFUSAL_MEMORY + Duration::from_secs(1)
            ),
            None
        );
        assert_eq!(refused, None);
        let mut refused = Some((at, refusal));
        assert_eq!(current(&mut refused, true, at), None);
        assert_eq!(refused, None);
    }

    /// The two ways a TLS handshake is refused, as librdkafka 2.12 with OpenSSL 3 logs them
    /// against `scripts/kafka.sh`'s SSL listener.
    #[test]
    fn an_untrusted_broker_or_a_refused_client_certificate_is_a_tls_refusal() {
        let untrusted = "ssl://localhost:9095/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 30ms in state SSL_HANDSHAKE)";
        let Some(Refusal::Tls(reason)) = Refusal::of_failure(untrusted) else {
            panic!("not a TLS refusal: {untrusted}");
        };
        assert!(
            reason.starts_with("error:0A000086:SSL routines::certificate verify failed"),
            "{reason}"
        );
        let no_client_cert = "ssl://localhost:9095/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate: SSL alert number 42 (after 2ms in state APIVERSION_QUERY)";
        let Some(Refusal::Tls(reason)) = Refusal::of_failure(no_client_cert) else {
            panic!("not a TLS refusal: {no_client_cert}");
        };
        assert!(
            reason.starts_with("error:0A000412:SSL routines::sslv3 alert bad certificate"),
            "{reason}"
        );
        let message = Refusal::Tls(reason).explain(&LogError::Kafka {
            message: "timed out".into(),
            transient: true,
        });
        assert!(
            message.contains("ssl.ca.location") && message.contains("alert bad certificate"),
            "{message}"
        );
    }
}
