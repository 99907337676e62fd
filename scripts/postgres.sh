#!/usr/bin/env bash
# A throwaway local PostgreSQL (Debian's packages) for tests, benchmarks and demos.
#
#   scripts/postgres.sh start    create a cluster in a temp dir, start it on 127.0.0.1:$PGPORT,
#                                wait until it accepts connections, print the connection URL
#   scripts/postgres.sh stop     stop it and delete its data
#   scripts/postgres.sh status   exit 0 and print the connection URL, or exit 1
#   scripts/postgres.sh url      print the connection URL (whether running or not)
#   scripts/postgres.sh tls      print the directory of the cluster's test certificates
#
# Installs nothing: the `postgresql` package comes from scripts/install-deps.sh. Every start is
# a fresh cluster (database `kontext`, user `kontext`, trust authentication on 127.0.0.1 only).
# The server offers TLS (ssl=on) with throwaway certificates from scripts/test-certs.sh: a
# server certificate for `localhost`, and a client certificate for the user `kontext_tls`, who
# may log in over TCP only with TLS and that certificate (`cert` authentication). The directory that
# `tls` prints holds ca.pem, client.pem, client.key and other-ca.pem (an authority that signed
# nothing here).
# Postgres refuses to run as root, so as root the cluster is created and run as the `postgres`
# OS user (the Debian package creates it); as any other user, as that user.
#
# Environment:
#   PGPORT                  port (default 55432, away from a system postgres on 5432)
#   KONTEXT_PG_START_TIMEOUT seconds to wait for connections (default 60)
#   PG_BINDIR               PostgreSQL's bin directory (default: the newest /usr/lib/postgresql/*/bin)
set -euo pipefail

PGPORT="${PGPORT:-55432}"
PG_HOST=127.0.0.1
PG_DB=kontext
PG_USER=kontext
START_TIMEOUT="${KONTEXT_PG_START_TIMEOUT:-60}"
# Per port, so that clusters on different ports coexist. Under /tmp rather than the repo: the
# `postgres` OS user must be able to reach it.
RUN_DIR="${TMPDIR:-/tmp}/kontext-postgres-$PGPORT"
DATA_DIR="$RUN_DIR/data"
LOG_FILE="$RUN_DIR/postgres.log"
TLS_DIR="$RUN_DIR/tls"
TLS_USER=kontext_tls
LOCK_FILE="${TMPDIR:-/tmp}/kontext-postgres-$PGPORT.lock"
URL="postgres://$PG_USER@$PG_HOST:$PGPORT/$PG_DB"

main() {
    case "${1:-}" in
        start) with_lock start ;;
        stop) with_lock stop ;;
        status) status ;;
        url) echo "$URL" ;;
        tls) echo "$TLS_DIR" ;;
        *)
            sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
}

die() {
    echo "postgres: $*" >&2
    exit 1
}

# start and stop hold a lock so that two test runs starting the cluster at once start one.
with_lock() {
    exec 8>"$LOCK_FILE"
    flock 8
    "$@"
}

# The newest installed major version, unless PG_BINDIR says otherwise.
bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        echo "$PG_BINDIR"
        return 0
    fi
    local dir
    dir="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1)"
    [[ -n "$dir" && -x "$dir/initdb" ]] ||
        die "no PostgreSQL server found under /usr/lib/postgresql: run scripts/install-deps.sh"
    echo "$dir"
}

# Runs a server program as the cluster's owner: `postgres` when we are root, else ourselves.
as_owner() {
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (it comes with the postgresql package)"
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

ready() {
    "$(bindir)/pg_isready" -q -h "$PG_HOST" -p "$PGPORT" -d "$PG_DB" -U "$PG_USER"
}

running() {
    [[ -f "$DATA_DIR/postmaster.pid" ]] && as_owner "$(bindir)/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1
}

status() {
    if running && ready; then
        echo "postgres: running on $PG_HOST:$PGPORT (data $DATA_DIR, log $LOG_FILE)"
        echo "$URL"
        return 0
    fi
    echo "postgres: not running on $PG_HOST:$PGPORT"
    return 1
}

start() {
    local bin
    bin="$(bindir)"
    if running; then
        wait_until_ready
        echo "postgres: already running on $PG_HOST:$PGPORT"
        echo "$URL"
        return 0
    fi
    cleanup_state
    if (exec 3<>"/dev/tcp/$PG_HOST/$PGPORT") 2>/dev/null; then
        die "port $PGPORT on $PG_HOST is taken by another process; set PGPORT"
    fi

    mkdir -p "$RUN_DIR"
    chmod 700 "$RUN_DIR"
    if ((EUID == 0)); then
        chown postgres: "$RUN_DIR"
    fi
    # Trust on the loopback only: a throwaway cluster for tests, never exposed.
    if ! as_owner "$bin/initdb" -D "$DATA_DIR" -U postgres --auth=trust -E UTF8 \
        --locale=C.UTF-8 >"$RUN_DIR/initdb.log" 2>&1; then
        cat "$RUN_DIR/initdb.log" >&2
        cleanup_state
        die "initdb failed"
    fi
    setup_tls
    # The socket goes into the run dir: /var/run/postgresql may be missing or another cluster's.
    if ! as_owner "$bin/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -w -t "$START_TIMEOUT" \
        -o "-c listen_addresses=$PG_HOST -p $PGPORT -k $RUN_DIR -c max_connections=200 \
            -c ssl=on -c ssl_cert_file=$TLS_DIR/server.pem -c ssl_key_file=$TLS_DIR/server.key \
            -c ssl_ca_file=$TLS_DIR/ca.pem" \
        start >/dev/null 8>&-; then
        fail_start "pg_ctl start failed"
    fi
    wait_until_ready_as_superuser
    create_database
    wait_until_ready
    echo "postgres: started on $PG_HOST:$PGPORT (data $DATA_DIR, log $LOG_FILE)"
    echo "$URL"
}

# Certificates for the server and for TLS_USER, who logs in only over TLS with a client
# certificate: a `cert` line ahead of initdb's trust lines (pg_hba.conf: first match wins).
setup_tls() {
    "$(dirname "${BASH_SOURCE[0]}")/test-certs.sh" "$TLS_DIR" "$TLS_USER" ||
        fail_start "creating test certificates failed"
    if ((EUID == 0)); then
        chown -R postgres: "$TLS_DIR"
    fi
    local hba="$DATA_DIR/pg_hba.conf" lines
    lines="$(printf 'hostssl all %s 127.0.0.1/32 cert\nhost all %s 127.0.0.1/32 reject\n' \
        "$TLS_USER" "$TLS_USER"; cat "$hba")"
    # Rewritten in place, so that the file keeps its owner.
    printf '%s\n' "$lines" >"$hba"
}

wait_until_ready_as_superuser() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$(bindir)/pg_isready" -q -h "$PG_HOST" -p "$PGPORT" -U postgres; do
        ((SECONDS < deadline)) || fail_start "no connections accepted within ${START_TIMEOUT}s"
        sleep 0.2
    done
}

wait_until_ready() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until ready; do
        ((SECONDS < deadline)) || fail_start "no connections accepted within ${START_TIMEOUT}s"
        sleep 0.2
    done
}

# The database uses an ICU (en-US) default collation where the server supports it, like most
# production databases: the store must not depend on the database's collation, and the tests
# then show it does not (its columns are COLLATE "C").
create_database() {
    local bin psql
    bin="$(bindir)"
    psql=("$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PGPORT" -U postgres -d postgres)
    "${psql[@]}" -c "CREATE ROLE $PG_USER LOGIN CREATEDB" >/dev/null ||
        fail_start "creating the role $PG_USER failed"
    "${psql[@]}" -c "CREATE ROLE $TLS_USER LOGIN" >/dev/null ||
        fail_start "creating the role $TLS_USER failed"
    if ! "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER TEMPLATE template0
            ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'" \
        >/dev/null 2>&1; then
        "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >/dev/null ||
            fail_start "creating the database $PG_DB failed"
    fi
    "${psql[@]}" -c "GRANT CREATE ON DATABASE $PG_DB TO $TLS_USER" >/dev/null ||
        fail_start "granting $TLS_USER its rights failed"
}

fail_start() {
    echo "postgres: $1; last lines of $LOG_FILE:" >&2
    tail -n 40 "$LOG_FILE" >&2 || true
    stop_server
    cleanup_state
    exit 1
}

stop() {
    if ! running; then
        cleanup_state
        echo "postgres: not running on $PG_HOST:$PGPORT"
        return 0
    fi
    stop_server
    cleanup_state
    echo "postgres: stopped"
}

# Fast shutdown: open sessions are disconnected, nothing needs to survive.
stop_server() {
    [[ -d "$DATA_DIR" ]] || return 0
    as_owner "$(bindir)/pg_ctl" -D "$DATA_DIR" -m fast -w -t 30 stop >/dev/null 2>&1 || true
}

cleanup_state() {
    # Guard: only ever delete the directory this script creates.
    if [[ "$RUN_DIR" == */kontext-postgres-"$PGPORT" && -d "$RUN_DIR" ]]; then
        rm -rf "$RUN_DIR"
    fi
}

main "$@"
