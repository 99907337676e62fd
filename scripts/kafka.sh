#!/usr/bin/env bash
# A local, single-node Apache Kafka 4.x (KRaft, combined broker + controller) for tests and demos.
#
#   scripts/kafka.sh start      start it on 127.0.0.1:$KAFKA_PORT and wait until it answers
#   scripts/kafka.sh stop       stop it and delete its data
#   scripts/kafka.sh status     exit 0 and say where it runs, or exit 1
#   scripts/kafka.sh restart    stop, then start (with empty data)
#   scripts/kafka.sh classpath  print the classpath of the Kafka jars (for Java helpers in tests)
#   scripts/kafka.sh logs       print the path of the broker's log file
#   scripts/kafka.sh pid        print the running broker's process id, or exit 1
#   scripts/kafka.sh tls        print the directory of the running broker's test certificates
#
# The jars come from Maven Central through Maven (scripts/kafka/pom.xml), cached in ~/.m2 and
# copied to scripts/.kafka/lib. Data lives in a temporary directory that `stop` removes: every
# start is a fresh cluster.
#
# Environment:
#   KAFKA_PORT             client port (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port (default KAFKA_PORT + 1)
#   KAFKA_SASL_PORT        SASL_PLAINTEXT (SCRAM-SHA-512) client port (default KAFKA_PORT + 2)
#   KAFKA_SSL_PORT         SSL (mutual TLS) client port (default KAFKA_PORT + 3)
#   KAFKA_SASL_SSL_PORT    SASL_SSL (SCRAM-SHA-512 over TLS) client port (default KAFKA_PORT + 4)
#
# Four client listeners: PLAINTEXT on KAFKA_PORT, whose clients are the ANONYMOUS principal, a
# super user; SASL_PLAINTEXT with SCRAM-SHA-512 on KAFKA_SASL_PORT; SSL on KAFKA_SSL_PORT,
# advertised as localhost (its certificate's only name), which requires a client certificate
# and takes the principal from its CN (the test client certificate's is User:kontext_tls); and
# SASL_SSL on KAFKA_SASL_SSL_PORT, advertised as localhost too: SCRAM-SHA-512 users over TLS,
# no client certificate (the way managed clusters are usually reached). On the last three,
# ACLs decide (StandardAuthorizer; nothing is allowed without an ACL). Users and ACLs are
# added through the PLAINTEXT listener: scripts/kafka-tool.sh configs / acls. The
# certificates come from scripts/test-certs.sh, made at each start into the directory that
# `tls` prints (ca.pem, client.pem, client.key, client-encrypted.key, other-ca.pem). A kontext
# deployment against a secured cluster is tested that way
# (crates/kontext-cli/tests/kafka_security.rs).
#   KAFKA_START_TIMEOUT    seconds to wait for the broker to answer (default 120)
#   KAFKA_HEAP_OPTS        JVM heap of the broker (default -Xms256m -Xmx1g)
#   KAFKA_JMX_PORT         if set, the broker's JMX on 127.0.0.1 at this port, no authentication
#                          (benchmarks read its request rates: bench/kafka_freshness.sh)
#   KAFKA_CACHE_DIR        jars and run state (default scripts/.kafka)
set -euo pipefail

# shellcheck source=SCRIPTDIR/kafka/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kafka/lib.sh"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-$((KAFKA_PORT + 2))}"
KAFKA_SSL_PORT="${KAFKA_SSL_PORT:-$((KAFKA_PORT + 3))}"
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-$((KAFKA_PORT + 4))}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
KAFKA_JMX_PORT="${KAFKA_JMX_PORT:-}"
KAFKA_HOST=127.0.0.1

# Per port, so that two brokers on different ports can coexist.
RUN_DIR="$KAFKA_CACHE_DIR/run/$KAFKA_PORT"
PID_FILE="$RUN_DIR/pid"
DATA_DIR_FILE="$RUN_DIR/data-dir"
LOG_FILE="$RUN_DIR/broker.log"

main() {
    case "${1:-}" in
        start) with_lock start ;;
        stop) with_lock stop ;;
        restart) with_lock stop && with_lock start ;;
        status) status ;;
        classpath) kafka_classpath ;;
        logs) echo "$LOG_FILE" ;;
        pid) broker_pid ;;
        tls) tls_dir ;;
        *)
            sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
}

# start and stop hold a lock so that two test runs starting the broker at once start one.
with_lock() {
    mkdir -p "$RUN_DIR"
    exec 8>"$RUN_DIR/.lock"
    flock 8
    "$@"
}

# The pid of our broker if it is alive. Checks the command line too, so that a stale pid file
# whose pid was reused by an unrelated process is not mistaken for the broker.
broker_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "kafka.Kafka $RUN_DIR/" || return 1
    echo "$pid"
}

status() {
    local pid
    if pid="$(broker_pid)"; then
        echo "kafka: running on $KAFKA_HOST:$KAFKA_PORT (pid $pid, data $(cat "$DATA_DIR_FILE" 2>/dev/null), log $LOG_FILE)"
        return 0
    fi
    echo "kafka: not running on $KAFKA_HOST:$KAFKA_PORT"
    return 1
}

port_open() {
    # bash's /dev/tcp: no nc or curl needed. The subshell keeps the fd from leaking.
    (exec 3<>"/dev/tcp/$KAFKA_HOST/$1") 2>/dev/null
}

start() {
    local pid
    if pid="$(broker_pid)"; then
        echo "kafka: already running on $KAFKA_HOST:$KAFKA_PORT (pid $pid)"
        return 0
    fi
    cleanup_state
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_PORT" "$KAFKA_SSL_PORT" \
        "$KAFKA_SASL_SSL_PORT"; do
        if port_open "$port"; then
            kafka_die "port $port on $KAFKA_HOST is taken by another process; set KAFKA_PORT"
        fi
    done

    local cp data_dir cluster_id
    cp="$(kafka_classpath)"
    data_dir="$(mktemp -d "${TMPDIR:-/tmp}/kontext-kafka-$KAFKA_PORT.XXXXXX")"
    echo "$data_dir" >"$DATA_DIR_FILE"
    "$(dirname "${BASH_SOURCE[0]}")/test-certs.sh" "$data_dir/tls" kontext_tls ||
        kafka_die "creating test certificates failed"
    # Kafka's PEM key store: the key and its certificate in one file.
    cat "$data_dir/tls/server.key" "$data_dir/tls/server.pem" >"$data_dir/tls/server-keystore.pem"
    write_config "$data_dir" >"$RUN_DIR/server.properties"
    cluster_id="$(random_cluster_id)"

    # --standalone: a dynamic KRaft quorum (KIP-853) whose only voter is this node, the way the
    # Kafka 4.x quickstart formats a single-node cluster.
    if ! java -Xmx256m -cp "$cp" -Dlog4j2.configurationFile="$KAFKA_LOG4J_CONFIG" \
        -Dkontext.kafka.log.level=WARN \
        kafka.tools.StorageTool format --standalone -t "$cluster_id" \
        -c "$RUN_DIR/server.properties" >"$LOG_FILE" 2>&1; then
        cat "$LOG_FILE" >&2
        cleanup_state
        kafka_die "formatting the KRaft storage failed"
    fi

    # setsid: the broker gets its own session, so it outlives the shell (and the CI step or
    # terminal) that started it, and Ctrl-C there does not reach it. The pid is written from
    # inside, before exec, so it is the JVM's pid whatever setsid does.
    # 8>&- : the broker must not inherit the start/stop lock, or it would hold it forever.
    local jmx=()
    if [[ -n "$KAFKA_JMX_PORT" ]]; then
        jmx=(-Dcom.sun.management.jmxremote.port="$KAFKA_JMX_PORT"
            -Dcom.sun.management.jmxremote.rmi.port="$KAFKA_JMX_PORT"
            -Dcom.sun.management.jmxremote.host="$KAFKA_HOST"
            -Djava.rmi.server.hostname="$KAFKA_HOST"
            -Dcom.sun.management.jmxremote.authenticate=false
            -Dcom.sun.management.jmxremote.ssl=false)
    fi
    # shellcheck disable=SC2086,SC2016 # KAFKA_HEAP_OPTS holds several words; $$ is for the child.
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
        java $KAFKA_HEAP_OPTS "${jmx[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$KAFKA_LOG4J_CONFIG" -Dkontext.kafka.log.level=INFO \
        -cp "$cp" kafka.Kafka "$RUN_DIR/server.properties" \
        >>"$LOG_FILE" 2>&1 </dev/null 8>&- &

    wait_until_ready
    echo "kafka: started on $KAFKA_HOST:$KAFKA_PORT, SASL/SCRAM on $KAFKA_HOST:$KAFKA_SASL_PORT, SSL on localhost:$KAFKA_SSL_PORT, SASL_SSL on localhost:$KAFKA_SASL_SSL_PORT (pid $(cat "$PID_FILE"), log $LOG_FILE)"
}

# Ready means a real client round trip works, not just an open port: the tools' admin client
# lists topics (which needs metadata from the controller).
wait_until_ready() {
    local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    # The launcher writes the pid file a moment after it was forked.
    while [[ ! -s "$PID_FILE" ]] && ((SECONDS < deadline)); do
        sleep 0.1
    done
    while ((SECONDS < deadline)); do
        if ! broker_pid >/dev/null; then
            fail_start "the broker exited during start-up"
        fi
        if port_open "$KAFKA_PORT" && metadata_ok; then
            return 0
        fi
        sleep 0.5
    done
    fail_start "the broker did not answer on $KAFKA_HOST:$KAFKA_PORT within ${KAFKA_START_TIMEOUT}s"
}

metadata_ok() {
    timeout 30 "$KAFKA_SCRIPTS_DIR/kafka-tool.sh" topics \
        --bootstrap-server "$KAFKA_HOST:$KAFKA_PORT" --list >/dev/null 2>&1
}

fail_start() {
    echo "kafka: $1; last lines of $LOG_FILE:" >&2
    tail -n 40 "$LOG_FILE" >&2 || true
    stop_broker
    cleanup_state
    exit 1
}

stop() {
    if ! broker_pid >/dev/null; then
        cleanup_state
        echo "kafka: not running on $KAFKA_HOST:$KAFKA_PORT"
        return 0
    fi
    stop_broker
    cleanup_state
    echo "kafka: stopped"
}

# SIGTERM lets the broker shut down cleanly; after 30 s it is killed.
stop_broker() {
    local pid
    pid="$(broker_pid)" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    echo "kafka: broker $pid did not stop within 30s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

# The running broker's certificates.
tls_dir() {
    [[ -f "$DATA_DIR_FILE" ]] || kafka_die "not running on $KAFKA_HOST:$KAFKA_PORT"
    echo "$(cat "$DATA_DIR_FILE")/tls"
}

# Removes the data directory and the pid file. The log file stays for post-mortems until the
# next start overwrites it.
cleanup_state() {
    if [[ -f "$DATA_DIR_FILE" ]]; then
        local data_dir
        data_dir="$(cat "$DATA_DIR_FILE")"
        # Guard: only ever delete a directory this script created.
        if [[ "$data_dir" == */kontext-kafka-"$KAFKA_PORT".* ]]; then
            rm -rf "$data_dir"
        fi
        rm -f "$DATA_DIR_FILE"
    fi
    rm -f "$PID_FILE"
}

# A Kafka cluster id is a UUID in URL-safe base64 without padding (22 characters). Kafka's own
# Uuid.randomUuid() rejects ids starting with '-' (they read as options); so do we.
random_cluster_id() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
        [[ "$id" != -* ]] && break
    done
    echo "$id"
}

# Settings for one node: every internal topic has replication factor 1 (the defaults of 3
# cannot be met), the first group rebalance is not delayed (tests would wait 3 s per group),
# and topics are never auto-created (kontext creates its topics explicitly; a typo should fail).
write_config() {
    local data_dir="$1"
    cat <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT,SASL_PLAINTEXT://$KAFKA_HOST:$KAFKA_SASL_PORT,SSL://$KAFKA_HOST:$KAFKA_SSL_PORT,SASL_SSL://$KAFKA_HOST:$KAFKA_SASL_SSL_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT,SASL_PLAINTEXT://$KAFKA_HOST:$KAFKA_SASL_PORT,SSL://localhost:$KAFKA_SSL_PORT,SASL_SSL://localhost:$KAFKA_SASL_SSL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.ssl.ssl.keystore.type=PEM
listener.name.ssl.ssl.keystore.location=$data_dir/tls/server-keystore.pem
listener.name.ssl.ssl.truststore.type=PEM
listener.name.ssl.ssl.truststore.location=$data_dir/tls/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$data_dir/tls/server-keystore.pem
ssl.principal.mapping.rules=RULE:^CN=([^,]+)\$/\$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
allow.everyone.if.no.acl.found=false
log.dirs=$data_dir/data
metadata.log.dir=$data_dir/metadata
num.partitions=12
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
min.insync.replicas=1
default.replication.factor=1
CONF
}

main "$@"
