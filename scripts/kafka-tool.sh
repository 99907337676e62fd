#!/usr/bin/env bash
# Runs one of Apache Kafka's own command-line tools from the jars scripts/kafka.sh uses, the way
# bin/kafka-<tool>.sh of a Kafka distribution would:
#
#   scripts/kafka-tool.sh topics --bootstrap-server 127.0.0.1:9092 --create --topic t --partitions 3
#   scripts/kafka-tool.sh console-producer --bootstrap-server 127.0.0.1:9092 --topic t \
#       --property parse.key=true --property key.separator=:
#   scripts/kafka-tool.sh console-consumer --bootstrap-server 127.0.0.1:9092 --topic t --from-beginning
#   scripts/kafka-tool.sh consumer-groups --bootstrap-server 127.0.0.1:9092 --describe --group g
#
# Tools: topics, console-producer, console-consumer, consumer-groups, configs, acls, get-offsets,
# broker-api-versions, metadata-quorum, transactions, delete-records, storage. The names of the
# distribution's scripts work too (kafka-topics.sh); a fully qualified main class is run as is.
# KAFKA_TOOL_OPTS adds JVM options (default -Xmx512m).
set -euo pipefail

# shellcheck source=SCRIPTDIR/kafka/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/kafka/lib.sh"

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
tool="$1"
shift
# Accept the distribution's script names: kafka-topics.sh -> topics.
tool="${tool%.sh}"
tool="${tool#kafka-}"

# Main classes as of Kafka 4.x (checked against the 4.1 jars: most tools moved from the Scala
# core to org.apache.kafka.tools; ConfigCommand and StorageTool are still in core).
case "$tool" in
    topics) main_class=org.apache.kafka.tools.TopicCommand ;;
    console-producer) main_class=org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) main_class=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    consumer-groups) main_class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    configs) main_class=kafka.admin.ConfigCommand ;;
    acls) main_class=org.apache.kafka.tools.AclCommand ;;
    get-offsets | get-offset-shell) main_class=org.apache.kafka.tools.GetOffsetShell ;;
    broker-api-versions) main_class=org.apache.kafka.tools.BrokerApiVersionsCommand ;;
    metadata-quorum) main_class=org.apache.kafka.tools.MetadataQuorumCommand ;;
    transactions) main_class=org.apache.kafka.tools.TransactionsCommand ;;
    delete-records) main_class=org.apache.kafka.tools.DeleteRecordsCommand ;;
    storage) main_class=kafka.tools.StorageTool ;;
    -h | --help | help) usage ;;
    *.*) main_class="$tool" ;;
    *) kafka_die "unknown tool '$tool' (see scripts/kafka-tool.sh --help)" ;;
esac

cp="$(kafka_classpath)"
# Short-lived tools: C1 only and the serial collector start the JVM noticeably faster.
# file.encoding: Java 17 still takes the default charset from the locale (POSIX in CI), which
# would mangle non-ASCII keys and values read or printed by the console tools.
# shellcheck disable=SC2086 # KAFKA_TOOL_OPTS holds several words on purpose.
exec java ${KAFKA_TOOL_OPTS:--Xmx512m} -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dfile.encoding=UTF-8 -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_LOG4J_CONFIG" \
    -Dkontext.kafka.log.level=WARN -cp "$cp" "$main_class" "$@"
