#!/usr/bin/env bash
# Throwaway TLS certificates for the local test servers (scripts/postgres.sh, scripts/kafka.sh).
#
#   scripts/test-certs.sh DIR [CLIENT_CN]
#
# Writes into DIR, unless already there:
#   ca.pem, ca.key          a self-signed certificate authority, valid for 30 days
#   server.pem, server.key  a server certificate it signed, for the name `localhost` only (no IP
#                           address in it: a client checking host names must connect to
#                           `localhost`; connecting to 127.0.0.1 fails that check, which the
#                           tests use to tell verify-full from verify-ca)
#   client.pem, client.key  a client certificate it signed, CN=CLIENT_CN (default kontext)
#   client-encrypted.key    the same key, encrypted (PKCS#8, AES-256) with the password
#                           kontext-test-key (what ssl.key.password opens)
#   other-ca.pem            a second authority that signed nothing here (a wrong trust anchor)
# Keys are unencrypted PKCS#8 PEM, mode 600. Never use these outside tests.
set -euo pipefail

dir="${1:?usage: scripts/test-certs.sh DIR [CLIENT_CN]}"
client_cn="${2:-kontext}"
if [[ -f "$dir/client.pem" ]]; then
    exit 0
fi
command -v openssl >/dev/null || {
    echo "test-certs: no openssl command: run scripts/install-deps.sh" >&2
    exit 1
}
mkdir -p "$dir"
cd "$dir"
umask 077

ca() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$2" \
        -keyout "$1.key" -out "$1.pem" 2>/dev/null
}

# $1 file stem, $2 subject CN, $3 extensions
signed() {
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

ca ca "kontext test CA"
ca other-ca "kontext test CA (another)"
rm -f other-ca.key
signed server localhost "subjectAltName=DNS:localhost
extendedKeyUsage=serverAuth"
signed client "$client_cn" "extendedKeyUsage=clientAuth"
openssl pkcs8 -topk8 -v2 aes-256-cbc -in client.key -out client-encrypted.key \
    -passout pass:kontext-test-key
chmod 644 ca.pem other-ca.pem server.pem client.pem
