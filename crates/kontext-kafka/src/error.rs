//! Mapping librdkafka's errors onto [`LogError`], keeping whether a retry can help.
//!
//! librdkafka has no per-code retriability test (only `rd_kafka_error_is_retriable` on the
//! error objects of the transactional API), so the classification below follows the Java
//! client: a broker error code is transient when its Java exception extends
//! `RetriableException` (or `InvalidMetadataException`, which does too), and a local code is
//! transient when it reports a timeout, a full queue or a connection problem that the client
//! recovers from by itself.

use kontext_log::LogError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Maps an rdkafka error to a [`LogError`]. Connection problems become
/// [`LogError::Unavailable`]; everything else [`LogError::Kafka`] with its retriability.
pub fn log_error(context: &str, err: KafkaError) -> LogError {
    if let KafkaError::Transaction(inner) = &err {
        // The transactional API does carry librdkafka's own verdict; prefer it.
        return LogError::Kafka {
            message: format!("{context}: {err}{}", acl_hint(inner.code())),
            transient: inner.is_retriable() && !inner.is_fatal(),
        };
    }
    if matches!(err, KafkaError::Canceled) {
        return LogError::Closed;
    }
    // rdkafka's `rdkafka_error_code()` leaves out the code of a failed admin operation.
    let code = match &err {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(code) if is_unavailable(code) => LogError::Unavailable(format!("{context}: {err}")),
        Some(code) => LogError::Kafka {
            message: format!("{context}: {err}{}", acl_hint(code)),
            transient: is_transient(code) && !is_fatal_variant(&err),
        },
        // Errors without a code: bad configuration, client creation, FFI (permanent), or a
        // poll that found nothing (never surfaced to callers).
        None => LogError::Kafka {
            message: format!("{context}: {err}{}", tls_file_hint(&err)),
            transient: false,
        },
    }
}

/// Maps a bare error code (as admin results and delivery reports carry them).
pub fn code_error(context: &str, code: RDKafkaErrorCode) -> LogError {
    if is_unavailable(code) {
        LogError::Unavailable(format!("{context}: {code}"))
    } else {
        LogError::Kafka {
            message: format!("{context}: {code}{}", acl_hint(code)),
            transient: is_transient(code),
        }
    }
}

/// What to do about an authorization failure: the principal lacks an ACL.
fn acl_hint(code: RDKafkaErrorCode) -> &'static str {
    use RDKafkaErrorCode as C;
    match code {
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed => {
            " (the cluster's ACLs do not allow this to kontext's principal: docs/kafka-security.md lists the ACLs a pipeline needs)"
        }
        _ => "",
    }
}

/// What to check when librdkafka could not load a TLS file it was given: it says only which
/// setting failed and OpenSSL's reason (`PEM lib` for a wrong key password, a file that is not
/// PEM, or a missing one).
fn tls_file_hint(err: &KafkaError) -> &'static str {
    let KafkaError::ClientCreation(message) = err else {
        return "";
    };
    if message.contains("ssl.key.location failed") {
        " (the client key could not be loaded: ssl.key.location must name a PEM private key, and an encrypted one needs its password in ssl.key.password)"
    } else if message.contains("ssl.certificate.location failed") {
        " (the client certificate could not be loaded: ssl.certificate.location must name a PEM certificate)"
    } else if message.contains("ssl.ca.location failed") {
        " (the trusted authorities could not be loaded: ssl.ca.location must name a PEM file or a directory of CA certificates)"
    } else {
        ""
    }
}

/// The broker could not be reached, or did not answer in time.
pub fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::OperationTimedOut
            | C::MessageTimedOut
            | C::TimedOutQueue
            | C::RequestTimedOut
            | C::BrokerNotAvailable
            | C::NetworkException
    )
}

/// Whether the same request may succeed if retried later (see the module docs for the rule).
pub fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    if is_unavailable(code) {
        return true;
    }
    matches!(
        code,
        // Local: the client recovers from these by itself.
        C::QueueFull
            | C::WaitingForCoordinator
            | C::InProgress
            | C::PreviousInProgress
            | C::Retry
            | C::WaitCache
            | C::NodeUpdate
            | C::ISRInsufficient
            | C::AssignmentLost
            // Broker, Java RetriableException / InvalidMetadataException subclasses.
            | C::InvalidMessage // CorruptRecordException
            | C::UnknownTopicOrPartition
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::ReplicaNotAvailable
            | C::CoordinatorLoadInProgress
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::NotController
            | C::ConcurrentTransactions
            | C::KafkaStorageError
            | C::FetchSessionIdNotFound
            | C::InvalidFetchSessionEpoch
            | C::ListenerNotFound
            | C::FencedLeaderEpoch
            | C::UnknownLeaderEpoch
            | C::OffsetNotAvailable
            | C::PreferredLeaderNotAvailable
            | C::EligibleLeadersNotAvailable
            | C::UnstableOffsetCommit
            | C::ThrottlingQuotaExceeded
            | C::ReassignmentInProgress
            | C::UnknownTopicId
            | C::RebootstrapRequired
    )
}

/// Variants librdkafka raises only for errors it will not recover from.
fn is_fatal_variant(err: &KafkaError) -> bool {
    matches!(err, KafkaError::MessageConsumptionFatal(_))
        || err.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_brokers_are_unavailable_and_transient() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::MessageTimedOut,
        ] {
            let err = log_error("produce", KafkaError::MessageProduction(code));
            assert!(matches!(err, LogError::Unavailable(_)), "{code:?}: {err:?}");
            assert!(err.is_transient());
        }
    }

    #[test]
    fn leadership_changes_are_transient() {
        let err = log_error(
            "produce",
            KafkaError::MessageProduction(RDKafkaErrorCode::NotLeaderForPartition),
        );
        assert!(
            matches!(
                err,
                LogError::Kafka {
                    transient: true,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn authorization_and_oversized_records_are_permanent() {
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidConfig,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
        ] {
            let err = log_error("produce", KafkaError::MessageProduction(code));
            assert!(!err.is_transient(), "{code:?} should be permanent");
        }
    }

    #[test]
    fn authorization_failures_point_at_the_acls_a_pipeline_needs() {
        let err = code_error("creating topic", RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(err.to_string().contains("docs/kafka-security.md"), "{err}");
        let err = log_error(
            "joining",
            KafkaError::MessageConsumption(RDKafkaErrorCode::GroupAuthorizationFailed),
        );
        assert!(err.to_string().contains("ACLs"), "{err}");
        let err = code_error("creating topic", RDKafkaErrorCode::TopicAlreadyExists);
        assert!(!err.to_string().contains("ACLs"), "{err}");
    }

    #[test]
    fn fatal_consumer_errors_are_permanent_even_for_retriable_codes() {
        let err = log_error(
            "poll",
            KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::NotCoordinator),
        );
        assert!(!err.is_transient(), "{err:?}");
    }

    #[test]
    fn admin_operations_keep_their_code() {
        let err = log_error(
            "create",
            KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut),
        );
        assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
        let err = log_error(
            "create",
            KafkaError::AdminOp(RDKafkaErrorCode::NotController),
        );
        assert!(
            matches!(
                err,
                LogError::Kafka {
                    transient: true,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_tls_file_librdkafka_cannot_load_names_what_to_check() {
        let cases = [
            ("ssl.key.location failed: error:0A080009:SSL routines::PEM lib", "ssl.key.password"),
            ("ssl.certificate.location failed: error:80000002:system library::No such file or directory", "PEM certificate"),
            ("ssl.ca.location failed: error:05880002:x509 certificate routines::system lib", "CA certificates"),
        ];
        for (message, hint) in cases {
            let err = log_error(
                "creating the admin client",
                KafkaError::ClientCreation(message.into()),
            );
            assert!(!err.is_transient(), "{err}");
            let text = err.to_string();
            assert!(text.contains(message) && text.contains(hint), "{text}");
        }
        let other = log_error(
            "creating the admin client",
            KafkaError::ClientCreation("No provider for SASL mechanism GSSAPI".into()),
        );
        assert!(
            !other.to_string().contains("could not be loaded"),
            "{other}"
        );
    }

    #[test]
    fn a_dropped_client_means_closed() {
        assert!(matches!(
            log_error("send", KafkaError::Canceled),
            LogError::Closed
        ));
    }
}
