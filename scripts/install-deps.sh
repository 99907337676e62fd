#!/usr/bin/env bash
# Installs the Debian packages that kontext's tests and scripts need. Idempotent: when all are
# installed it only checks, without touching apt's lists (a second run takes well under a second).
#
#   kcat                      poking at topics by hand, and the interop tests (a C client)
#   (pip) confluent-kafka     the interop tests' Python Kafka client, from scripts/requirements-test.txt
#   (pip) mcp                 the official Python MCP SDK, the MCP tests' client (same file)
#   openjdk-17-jdk-headless   runs the local broker (scripts/kafka.sh) and the single-file Java
#                             helpers of tests (`java File.java` needs the JDK's compiler module)
#   maven                     resolves the Kafka jars from Maven Central (scripts/kafka/pom.xml)
#   postgresql                the PostgreSQL server (15 on bookworm) that scripts/postgres.sh runs
#                             for the PostgreSQL context store's tests and benchmarks
#   build-essential, pkg-config, zlib1g-dev, libssl-dev
#                             rdkafka-sys compiles librdkafka from source, with TLS/SCRAM; the
#                             openssl crate (PostgreSQL's TLS) links the same libssl
#   openssl                   the command scripts/test-certs.sh makes the test servers' certificates with
set -euo pipefail

PACKAGES=(kcat openjdk-17-jdk-headless maven postgresql build-essential pkg-config zlib1g-dev libssl-dev openssl)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all installed (${PACKAGES[*]})"
else
    SUDO=()
    if ((EUID != 0)); then
        SUDO=(sudo)
    fi
    echo "install-deps: installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python clients the interop tests drive (Confluent's confluent-kafka, the MCP SDK), pinned.
# Compares installed versions with the pins without importing the packages (importing the MCP
# SDK alone takes seconds), so a second run stays fast and a stale version gets replaced.
requirements="$(dirname "${BASH_SOURCE[0]}")/requirements-test.txt"
if ! python3 - "$requirements" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version

for line in open(sys.argv[1]):
    name, _, pinned = line.split("#")[0].strip().partition("==")
    if name and version(name) != pinned:
        sys.exit(1)
PY
then
    echo "install-deps: pip install -r $requirements"
    python3 -m pip install -q --disable-pip-version-check -r "$requirements"
fi
