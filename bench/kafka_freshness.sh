#!/usr/bin/env bash
# One run of the quickstart's freshness on Apache Kafka (BENCHMARKS.md, "Freshness"):
#
#   bench/kafka_freshness.sh [RATE] [-- QUICKSTART_ARGS...]
#   bench/kafka_freshness.sh 1000 -- --partitions 4
#
# 1. A fresh single-node broker on KAFKA_PORT (scripts/kafka.sh restart: empty data), with its
#    JMX on JMX_PORT.
# 2. `kontext quickstart --kafka 127.0.0.1:KAFKA_PORT --rate RATE` (default 1000 events/s) with
#    a new data directory and QUICKSTART_ARGS.
# 3. WARMUP seconds after the start, a snapshot of kontext's /metrics, of the broker's and
#    kontext's CPU time (/proc/<pid>/stat) and of the broker's request counters (JMX:
#    kafka.network RequestMetrics RequestsPerSec, per API; BrokerTopicMetrics
#    TotalProduceRequestsPerSec, per topic); WINDOW seconds later, another.
# 4. Prints each process's CPU over the window (100% = one core), the broker's requests per
#    second by API and its produce requests by topic (`Produce:<topic>`), where the broker's
#    time on a ProduceRequest goes (p50 and p99 of RequestMetrics *TimeMs, read at the end), and
#    bench/histogram_delta.py of the two snapshots (freshness by kind, the processor's steps).
#
# Compare builds or settings by alternating runs, each on its fresh broker: the machine's noise
# moves these numbers more than most changes do.
#
# Environment: KONTEXT (the kontext binary; default target/release/kontext, built if missing),
# KAFKA_PORT (19092; its four neighbours are taken too, see scripts/kafka.sh), JMX_PORT (19999),
# PORT (kontext's HTTP port, 18281), WARMUP (35), WINDOW (20).
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=1000
if [[ $# -gt 0 && "$1" != "--" ]]; then
    RATE="$1"
    shift
fi
[[ "${1:-}" == "--" ]] && shift
export KAFKA_PORT="${KAFKA_PORT:-19092}"
export KAFKA_JMX_PORT="${JMX_PORT:-19999}"
PORT="${PORT:-18281}"
WARMUP="${WARMUP:-35}"
WINDOW="${WINDOW:-20}"
KONTEXT="${KONTEXT:-target/release/kontext}"
if [[ ! -x "$KONTEXT" ]]; then
    cargo build --release --locked -p kontext-cli
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kontext-kafka-freshness.XXXXXX")"
kontext_pid=""
cleanup() {
    local status=$?
    if [[ $status -ne 0 && -f "$WORK/quickstart.log" ]]; then
        echo "kafka freshness: failed; the quickstart's last lines:" >&2
        tail -n 20 "$WORK/quickstart.log" >&2
    fi
    [[ -n "$kontext_pid" ]] && kill "$kontext_pid" 2>/dev/null && wait "$kontext_pid" 2>/dev/null
    scripts/kafka.sh stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat; the
# command name, field 2, has no spaces for java and kontext).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One reading of the broker's JMX beans named by the arguments (--object-name, --attributes),
# in JmxTool's properties format; its errors are appended to $WORK/jmx.err.
jmx() {
    java -cp "$(scripts/kafka.sh classpath)" org.apache.kafka.tools.JmxTool \
        --jmx-url "service:jmx:rmi:///jndi/rmi://127.0.0.1:$KAFKA_JMX_PORT/jmxrmi" \
        --one-time true --report-format properties "$@" 2>>"$WORK/jmx.err"
}

# The broker's cumulative request counts, one "API count" line each, sorted, and first a
# "@time <ms>" line: when JmxTool read them (its JVM takes a second or so to start).
requests() {
    jmx --object-name 'kafka.network:type=RequestMetrics,name=RequestsPerSec,request=*,version=*' \
        --object-name 'kafka.server:type=BrokerTopicMetrics,name=TotalProduceRequestsPerSec,topic=*' \
        --attributes Count |
        sed -n -e 's/^time=\([0-9]*\)$/@time \1/p' \
            -e 's/.*request=\([A-Za-z]*\),version=[0-9]*:Count=\([0-9]*\).*/\1 \2/p' \
            -e 's/.*TotalProduceRequestsPerSec,topic=\([^:]*\):Count=\([0-9]*\).*/Produce:\1 \2/p' |
        awk '{n[$1] += $2} END {for (k in n) printf "%s %.0f\n", k, n[k]}' | LC_ALL=C sort
}

# Where the broker's time on a ProduceRequest goes, in ms at p50 and p99 (JMX RequestMetrics,
# Yammer histograms biased to the last five minutes, so they cover the whole run): waiting for
# an I/O thread (RequestQueue), appending (Local), waiting for the network thread (ResponseQueue)
# and sending (ResponseSend); Total is their sum and more.
produce_times() {
    jmx --object-name 'kafka.network:type=RequestMetrics,name=*TimeMs,request=Produce' \
        --attributes 50thPercentile,99thPercentile |
        sed -n 's/.*name=\(Total\|RequestQueue\|Local\|ResponseQueue\|ResponseSend\)TimeMs,request=Produce:\([0-9]*\)thPercentile=\([0-9.E-]*\).*/\1 \2 \3/p' |
        awk '{v[$1, $2] = $3; n[$1] = 1}
             END {for (k in n) printf "  %-14s p50 %6.2f  p99 %6.2f ms\n", k, v[k, 50], v[k, 99]}' |
        LC_ALL=C sort
}

snapshot() {
    if ! kill -0 "$kontext_pid" 2>/dev/null; then
        echo "kafka freshness: the quickstart exited during the run" >&2
        exit 1
    fi
    curl -sf "localhost:$PORT/metrics" >"$WORK/metrics.$1"
    ticks "$broker_pid" >"$WORK/broker.$1"
    ticks "$kontext_pid" >"$WORK/kontext.$1"
    requests >"$WORK/requests.$1"
    grep -q '^@time ' "$WORK/requests.$1" || {
        cat "$WORK/jmx.err" >&2
        echo "kafka freshness: no request counters from the broker's JMX" >&2
        exit 1
    }
}

scripts/kafka.sh restart >/dev/null
broker_pid="$(scripts/kafka.sh pid)"
"$KONTEXT" quickstart --kafka "127.0.0.1:$KAFKA_PORT" --rate "$RATE" --port "$PORT" \
    --data-dir "$WORK/data" "$@" >"$WORK/quickstart.log" 2>&1 &
kontext_pid=$!
echo "kafka freshness: $KONTEXT, rate $RATE, args [$*], $(date -u +%H:%M:%S) UTC," \
    "load $(cut -d' ' -f1-3 /proc/loadavg)"
sleep "$WARMUP"
snapshot 1
sleep "$WINDOW"
snapshot 2

hz="$(getconf CLK_TCK)"
for p in broker kontext; do
    echo "$p CPU: $(((($(cat "$WORK/$p.2") - $(cat "$WORK/$p.1")) * 100) / (hz * WINDOW)))%"
done
# Rates over the interval between the two JMX reads, not WINDOW: each read starts a JVM.
echo "broker requests/s:"
LC_ALL=C join -a 2 -e 0 -o 0,1.2,2.2 "$WORK/requests.1" "$WORK/requests.2" |
    awk '$1 == "@time" {s = ($3 - $2) / 1000; next} {d[$1] = $3 - $2}
         END {for (k in d) if (d[k] > 0) printf "  %-20s %8.0f\n", k, d[k] / s}' | LC_ALL=C sort
echo "broker time per ProduceRequest:"
produce_times
bench/histogram_delta.py "$WORK/metrics.1" "$WORK/metrics.2"
