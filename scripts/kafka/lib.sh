# Shared by scripts/kafka.sh and scripts/kafka-tool.sh (sourced, not run): where the Kafka jars
# live and how to resolve them. One place, so the broker and the tools always use the same jars.

# shellcheck shell=bash

KAFKA_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_POM="$KAFKA_SCRIPTS_DIR/kafka/pom.xml"
# shellcheck disable=SC2034 # used by the scripts that source this file
KAFKA_LOG4J_CONFIG="$KAFKA_SCRIPTS_DIR/kafka/log4j2.properties"
# Gitignored cache: resolved jars and the state of running brokers.
KAFKA_CACHE_DIR="${KAFKA_CACHE_DIR:-$KAFKA_SCRIPTS_DIR/.kafka}"
KAFKA_LIB_DIR="$KAFKA_CACHE_DIR/lib"

kafka_die() {
    echo "kafka: $*" >&2
    exit 1
}

# Copies the jars the pom resolves into $KAFKA_LIB_DIR, unless they are already there for this
# exact pom (the stamp holds the pom's hash, so bumping kafka.version re-resolves). Maven keeps
# its own cache in ~/.m2, so a re-resolve after a wipe of .kafka/ does not download again.
kafka_resolve_jars() {
    local want have=""
    command -v java >/dev/null || kafka_die "java not found: run scripts/install-deps.sh"
    want="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
    [[ -f "$KAFKA_LIB_DIR/.stamp" ]] && have="$(cat "$KAFKA_LIB_DIR/.stamp")"
    [[ "$want" == "$have" ]] && return 0

    command -v "${MVN:-mvn}" >/dev/null || kafka_die "maven not found: run scripts/install-deps.sh"
    mkdir -p "$KAFKA_CACHE_DIR"
    # Lock so that two callers (a test and a script) resolving at once do not interleave.
    (
        flock 9
        [[ -f "$KAFKA_LIB_DIR/.stamp" && "$(cat "$KAFKA_LIB_DIR/.stamp")" == "$want" ]] && exit 0
        echo "kafka: resolving Apache Kafka jars with Maven (first run only) ..." >&2
        rm -rf "$KAFKA_LIB_DIR.tmp"
        # Maven's progress goes to stderr so that `kafka.sh classpath` keeps a clean stdout.
        if ! "${MVN:-mvn}" -q -B -f "$KAFKA_POM" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIB_DIR.tmp" >&2; then
            kafka_die "maven could not resolve $KAFKA_POM (is Maven Central reachable?)"
        fi
        echo "$want" >"$KAFKA_LIB_DIR.tmp/.stamp"
        rm -rf "$KAFKA_LIB_DIR"
        mv "$KAFKA_LIB_DIR.tmp" "$KAFKA_LIB_DIR"
    ) 9>"$KAFKA_CACHE_DIR/.resolve.lock"
}

# The classpath of the broker and the tools, resolving the jars first if needed.
kafka_classpath() {
    kafka_resolve_jars
    local jars=("$KAFKA_LIB_DIR"/*.jar)
    [[ -e "${jars[0]}" ]] || kafka_die "no jars in $KAFKA_LIB_DIR; delete it and retry"
    local IFS=:
    echo "${jars[*]}"
}
