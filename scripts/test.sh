#!/usr/bin/env bash
# Every check CI runs, in CI's order, on a fresh machine or a developer's:
#   1. install what the tests need (Debian packages, Python packages)
#   2. start a local Apache Kafka broker (scripts/kafka.sh) and PostgreSQL (scripts/postgres.sh)
#   3. cargo fmt --check, cargo clippy -D warnings, cargo doc -D warnings, cargo test (unit +
#      integration tests against the real broker and the embedded log)
#   4. stop the broker and PostgreSQL (if this run started them), whatever happened
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh

started_kafka=0
if ! scripts/kafka.sh status >/dev/null 2>&1; then
    scripts/kafka.sh start
    started_kafka=1
fi
cleanup() {
    if [[ $started_kafka == 1 ]]; then
        scripts/kafka.sh stop || true
    fi
    if [[ $started_postgres == 1 ]]; then
        scripts/postgres.sh stop || true
    fi
}
started_postgres=0
trap cleanup EXIT
# After the trap: if PostgreSQL fails to start, the broker started above is still stopped.
if ! scripts/postgres.sh status >/dev/null 2>&1; then
    scripts/postgres.sh start
    started_postgres=1
fi

export KONTEXT_TEST_KAFKA="${KONTEXT_TEST_KAFKA:-127.0.0.1:9092}"
# The same broker's SASL_PLAINTEXT/SCRAM listener, where ACLs decide (tests/kafka_security.rs).
export KONTEXT_TEST_KAFKA_SASL="${KONTEXT_TEST_KAFKA_SASL:-127.0.0.1:9094}"
# Its SSL (mutual TLS) listener, by the name its certificate holds, and its certificates.
export KONTEXT_TEST_KAFKA_SSL="${KONTEXT_TEST_KAFKA_SSL:-localhost:9095}"
# Its SASL_SSL listener (SCRAM over TLS), by the same name.
export KONTEXT_TEST_KAFKA_SASL_SSL="${KONTEXT_TEST_KAFKA_SASL_SSL:-localhost:9096}"
# (Assigned, then exported: `export VAR="$(cmd)"` would hide a failing cmd from `set -e`.)
KONTEXT_TEST_KAFKA_TLS="${KONTEXT_TEST_KAFKA_TLS:-$(scripts/kafka.sh tls)}"
export KONTEXT_TEST_KAFKA_TLS
export KONTEXT_TEST_POSTGRES="${KONTEXT_TEST_POSTGRES:-$(scripts/postgres.sh url)}"
# Its TLS certificates (src/postgres/tls_tests.rs in kontext-store).
KONTEXT_TEST_POSTGRES_TLS="${KONTEXT_TEST_POSTGRES_TLS:-$(scripts/postgres.sh tls)}"
export KONTEXT_TEST_POSTGRES_TLS

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
# Public docs must not link to what they cannot show (broken or private intra-doc links).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== cargo test"
cargo test --workspace --locked "$@"
