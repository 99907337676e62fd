#!/usr/bin/env bash
# The serving benchmark of BENCHMARKS.md ("Serving"), every number from one run:
#
#   bench/serve.sh               all phases below
#   bench/serve.sh --no-kafka    skip the Kafka freshness phase
#
# 1. `kontext quickstart` (release build) on the embedded log, generating INGEST_RATE events/s
#    for CUSTOMERS customers: the pipeline ingests while everything below is measured.
# 2. Context fetch over HTTP on loopback (bench/loadgen, open loop, latency from the scheduled
#    send time, so stalls are not hidden): JSON at RATE requests/s; markdown at a 500-token budget
#    at MD_RATE requests/s; then the maximum throughput (closed loop, MAX_CONNECTIONS).
# 3. Yardsticks in the same conditions (the pipeline still ingesting): Redis GET of the same
#    JSON documents, and PostgreSQL point reads of them (pgbench at the same fixed rate).
# 4. Freshness, embedded: loadgen polls FRESH_CUSTOMERS customers back to back and records, for
#    every newly applied event it sees, the API's own staleness (now - event time).
# 5. Freshness on Apache Kafka: the same with `quickstart --kafka` against a private local broker
#    (KAFKA_PORT, default 19092, started and stopped here).
#
# Installs redis-server from Debian if it is missing (benchmarks only; no test needs it).
# Environment: RATE (10000), EXTRA_RATES (more fixed rates, e.g. "1000 3000"), MD_RATE (2000), SECONDS_PER_RUN (20), INGEST_RATE (1000),
# CUSTOMERS (200), CONNECTIONS (16), MAX_CONNECTIONS (8), PORT (18080), PGPORT (55433),
# REDIS_PORT (56379), KAFKA_PORT (19092), OUT (bench/out/serve-<time>.txt), KONTEXT (a built
# kontext binary to use instead of building one), SERVE_THREADS (0: the API shares the
# pipeline's runtime; N: `quickstart --serve-threads N`), SERVE_REALTIME_PRIORITY (0; P:
# `--serve-realtime-priority P` for those threads, needs SERVE_THREADS and CAP_SYS_NICE).
set -euo pipefail
cd "$(dirname "$0")/.."

RATE="${RATE:-10000}"
# More fixed rates for the JSON fetch (e.g. one the machine sustains when 10k is too much).
EXTRA_RATES="${EXTRA_RATES:-}"
MD_RATE="${MD_RATE:-2000}"
SECS="${SECONDS_PER_RUN:-20}"
INGEST_RATE="${INGEST_RATE:-1000}"
CUSTOMERS="${CUSTOMERS:-200}"
CONNECTIONS="${CONNECTIONS:-16}"
MAX_CONNECTIONS="${MAX_CONNECTIONS:-8}"
PORT="${PORT:-18080}"
export PGPORT="${PGPORT:-55433}"
REDIS_PORT="${REDIS_PORT:-56379}"
export KAFKA_PORT="${KAFKA_PORT:-19092}"
WITH_KAFKA=1
[[ "${1:-}" == "--no-kafka" ]] && WITH_KAFKA=0
mkdir -p bench/out
OUT="${OUT:-bench/out/serve-$(date -u +%Y%m%dT%H%M%SZ).txt}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kontext-serve-bench.XXXXXX")"
IDS="10000:$((10000 + CUSTOMERS))"
FRESH_IDS="10000:$((10000 + ${FRESH_CUSTOMERS:-20}))"
# KONTEXT: a kontext binary to use instead of building target/release/kontext.
KONTEXT_BIN="${KONTEXT:-}"
KONTEXT="${KONTEXT_BIN:-target/release/kontext}"
LOADGEN=target/loadgen/release/kontext-loadgen
pids=()

say() { echo "$*" | tee -a "$OUT"; }
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ -n "${REDIS_STARTED:-}" ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    [[ -n "${KAFKA_STARTED:-}" ]] && scripts/kafka.sh stop >/dev/null 2>&1 || true
    [[ -n "${PG_STARTED:-}" ]] && scripts/postgres.sh stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

[[ -n "$KONTEXT_BIN" ]] || cargo build --release --bin kontext
CARGO_TARGET_DIR=target/loadgen cargo build --release --manifest-path bench/loadgen/Cargo.toml
if ! command -v redis-server >/dev/null; then
    apt-get install -y -q redis-server >/dev/null
fi
# The yardstick's server on PGPORT: one already running is used as it is, and left running.
if ! scripts/postgres.sh status >/dev/null 2>&1; then
    scripts/postgres.sh start >/dev/null
    PG_STARTED=1
fi
PG_URL="$(scripts/postgres.sh url)"

say "# bench/serve.sh, $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "# rate=$RATE md_rate=$MD_RATE seconds=$SECS ingest_rate=$INGEST_RATE customers=$CUSTOMERS connections=$CONNECTIONS"

# Waits until the pipeline has worked off the initial load (the generator runs on): the
# `kontext_event_lag_milliseconds` gauge (event time to store commit of the newest event of the
# last batch) under 200 ms in three scrapes in a row, one second apart; at most 120 s. On Kafka
# the catch-up takes tens of seconds, and measuring during it gave second-long freshness.
wait_steady() {
    local steady=0 lag
    for _ in $(seq 1 120); do
        lag="$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '$1 == "kontext_event_lag_milliseconds" {print int($2)}')"
        if [[ -n "$lag" && "$lag" -lt 200 ]]; then
            steady=$((steady + 1))
            [[ "$steady" -ge 3 ]] && return 0
        else
            steady=0
        fi
        sleep 1
    done
    echo "# the pipeline did not settle within 120 s (event lag ${lag:-unknown} ms); measuring anyway" >&2
}

# Starts the quickstart in the background and waits until customer C-10000 is served and the
# pipeline is steady.
start_quickstart() { # data dir, extra args...
    local dir="$1"; shift
    "$KONTEXT" quickstart --port "$PORT" --data-dir "$dir" --customers "$CUSTOMERS" \
        --rate "$INGEST_RATE" --serve-threads "${SERVE_THREADS:-0}" \
        --serve-realtime-priority "${SERVE_REALTIME_PRIORITY:-0}" "$@" >"$dir.log" 2>&1 &
    QS_PID=$!
    pids+=("$QS_PID")
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$PORT/v1/context/customer/C-$((10000 + CUSTOMERS - 1))" >/dev/null; then
            wait_steady
            return 0
        fi
        sleep 0.2
    done
    echo "quickstart did not come up; log:" >&2
    tail -20 "$dir.log" >&2
    exit 1
}
# The freshness phase: loadgen through the API, and the pipeline's own histograms over the
# same seconds (every applied update, by kind: entity = source events, features = processor
# outputs).
fresh_with_histograms() {
    curl -sf "http://127.0.0.1:$PORT/metrics" >"$WORK/metrics.before"
    loadgen fresh --addr "127.0.0.1:$PORT" --target '/v1/context/customer/C-{i}' --ids "$FRESH_IDS" \
        --seconds "$SECS" --warmup 2 --connections 4
    curl -sf "http://127.0.0.1:$PORT/metrics" >"$WORK/metrics.after"
    say "# pipeline histograms over the same seconds (bucket bounds):"
    bench/histogram_delta.py "$WORK/metrics.before" "$WORK/metrics.after" | sed 's/^/#   /' | tee -a "$OUT"
}
stop_quickstart() {
    kill "$QS_PID" 2>/dev/null || true
    wait "$QS_PID" 2>/dev/null || true
}
loadgen() { "$LOADGEN" "$@" | tee -a "$OUT"; }

# ---- embedded: HTTP latency at a fixed rate, max throughput, freshness -----------------------
start_quickstart "$WORK/embedded"
say "## embedded log, ingesting $INGEST_RATE events/s"
for rate in $RATE $EXTRA_RATES; do
    say "# context JSON at $rate rps"
    loadgen fixed --addr "127.0.0.1:$PORT" --target '/v1/context/customer/C-{i}' --ids "$IDS" \
        --rate "$rate" --seconds "$SECS" --warmup 2 --connections "$CONNECTIONS"
done
say "# context markdown, 500-token budget, at $MD_RATE rps"
loadgen fixed --addr "127.0.0.1:$PORT" --target '/v1/context/customer/C-{i}?format=markdown&max_tokens=500' \
    --ids "$IDS" --rate "$MD_RATE" --seconds "$SECS" --warmup 2 --connections "$CONNECTIONS"
say "# maximum throughput, JSON, closed loop"
loadgen max --addr "127.0.0.1:$PORT" --target '/v1/context/customer/C-{i}' --ids "$IDS" \
    --seconds 10 --warmup 1 --connections "$MAX_CONNECTIONS"
say "# maximum throughput, markdown 500 tokens, closed loop"
loadgen max --addr "127.0.0.1:$PORT" --target '/v1/context/customer/C-{i}?format=markdown&max_tokens=500' \
    --ids "$IDS" --seconds 10 --warmup 1 --connections "$MAX_CONNECTIONS"

# ---- yardsticks: the same documents from Redis and PostgreSQL, the pipeline still ingesting --
docs="$WORK/docs.tsv"
for i in $(seq 10000 $((10000 + CUSTOMERS - 1))); do
    printf 'C-%s\t%s\n' "$i" "$(curl -sf "http://127.0.0.1:$PORT/v1/context/customer/C-$i")"
done >"$docs"
say "# documents: $(wc -l <"$docs"), mean $(awk -F'\t' '{ n += length($2) } END { printf "%d", n / NR }' "$docs") bytes"

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$WORK" >/dev/null
REDIS_STARTED=1
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
while IFS=$'\t' read -r id doc; do
    printf '%s' "$doc" | redis-cli -p "$REDIS_PORT" -x set "$id" >/dev/null
done <"$docs"
say "# yardstick: Redis $(redis-server --version | grep -o 'v=[0-9.]*') GET of the same JSON at $RATE rps"
loadgen fixed --proto redis --addr "127.0.0.1:$REDIS_PORT" --target 'C-{i}' --ids "$IDS" \
    --rate "$RATE" --seconds "$SECS" --warmup 2 --connections "$CONNECTIONS"

psql -q "$PG_URL" -c 'DROP TABLE IF EXISTS bench_context' \
    -c 'CREATE TABLE bench_context (id text PRIMARY KEY, doc json NOT NULL)'
# CSV with a quote character that JSON never holds: the documents go in byte for byte.
psql -q "$PG_URL" -c "\\copy bench_context FROM '$docs' WITH (FORMAT csv, DELIMITER E'\\t', QUOTE E'\\x01')"
psql -q "$PG_URL" -c 'VACUUM ANALYZE bench_context'
cat >"$WORK/point.sql" <<EOF
\\set i random(10000, $((10000 + CUSTOMERS - 1)))
SELECT doc FROM bench_context WHERE id = 'C-' || :i;
EOF
say "# yardstick: PostgreSQL $(psql -tAq "$PG_URL" -c 'SHOW server_version' | cut -d' ' -f1) point read (pgbench, prepared, same documents) at $RATE rps"
# With --rate, pgbench logs each transaction's latency from its *scheduled* start (lag
# included), like loadgen. Columns: client, txn, latency_us, script, epoch, us, lag_us.
(cd "$WORK" && pgbench -n -M prepared -f point.sql -R "$RATE" -c "$CONNECTIONS" -j 2 \
    -T "$((SECS + 2))" -l --log-prefix=pgb "$PG_URL" >pgbench.out 2>&1) || { cat "$WORK/pgbench.out"; exit 1; }
# Drop the first 2 s (warm-up) like loadgen does.
cat "$WORK"/pgb.* | sort -k5,5n -k6,6n | awk -v warm=2 '
    NR == 1 { t0 = $5 } $5 - t0 >= warm { print $3 }' | sort -n >"$WORK/pg.lat"
awk -v secs="$SECS" '{ a[NR] = $1 } END {
    q = "p50_us=" a[int(NR*0.5)] " p90_us=" a[int(NR*0.9)] " p99_us=" a[int(NR*0.99)] " p99.9_us=" a[int(NR*0.999)] " max_us=" a[NR];
    printf "mode=fixed proto=postgres achieved_rps=%.0f n=%d %s\n", NR/secs, NR, q }' "$WORK/pg.lat" | tee -a "$OUT"
grep -E "^(number of failed|latency average|rate limit schedule lag)" "$WORK/pgbench.out" | sed 's/^/#   pgbench: /' | tee -a "$OUT"
psql -q "$PG_URL" -c 'DROP TABLE bench_context'
redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
REDIS_STARTED=

say "# freshness, embedded log: event time -> seen through the API, ingesting $INGEST_RATE events/s"
fresh_with_histograms
stop_quickstart

# ---- Kafka: freshness ------------------------------------------------------------------------
if [[ "$WITH_KAFKA" == 1 ]]; then
    if ! scripts/kafka.sh status >/dev/null; then
        scripts/kafka.sh start >/dev/null
        KAFKA_STARTED=1
    fi
    start_quickstart "$WORK/kafka" --kafka "127.0.0.1:$KAFKA_PORT"
    say "## Apache Kafka (local single-node broker on the same cores), ingesting $INGEST_RATE events/s"
    say "# freshness, Kafka: event time -> seen through the API"
    fresh_with_histograms
    say "# context JSON at $RATE rps (Kafka backend)"
    loadgen fixed --addr "127.0.0.1:$PORT" --target '/v1/context/customer/C-{i}' --ids "$IDS" \
        --rate "$RATE" --seconds "$SECS" --warmup 2 --connections "$CONNECTIONS"
    stop_quickstart
fi
say "# done; load average $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
