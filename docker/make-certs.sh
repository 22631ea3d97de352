#!/usr/bin/env bash
# The consortium's TLS material for the SuperLink, made with openssl.
#
#   docker/make-certs.sh OUT_DIR [SAN]
#
# OUT_DIR receives:
#   ca.crt       consortium CA certificate: give it to every hospital (public)
#   ca.key       CA private key: stays with the consortium, offline if possible
#   server.pem   SuperLink certificate, signed by the CA
#   server.key   SuperLink private key: stays on the coordinator host
# SAN is the SuperLink's address as the hospitals dial it, in openssl's
# subjectAltName syntax (default "IP:127.0.0.1,DNS:localhost"), for example
# "DNS:fl.consortium.example,IP:203.0.113.7".
#
# An existing CA is reused (so hospitals' ca.crt stays valid when the server
# certificate is renewed); existing files are never overwritten otherwise.
# Nothing here is a hospital's secret: hospitals make their own node keys
# (kidneyfl site keygen) and send only the public half.
set -euo pipefail

out=${1:?usage: make-certs.sh OUT_DIR [SAN]}
san=${2:-IP:127.0.0.1,DNS:localhost}
days=${KIDNEYFL_CERT_DAYS:-825}
mkdir -p "$out"
umask 077

if [[ ! -f "$out/ca.key" ]]; then
  openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
  openssl req -new -x509 -key "$out/ca.key" -sha256 -days "$days" \
    -subj "/O=kidneyfl consortium/CN=kidneyfl consortium CA" -out "$out/ca.crt"
  echo "made consortium CA: $out/ca.crt (private key $out/ca.key stays here)"
fi
if [[ -f "$out/server.pem" ]]; then
  echo "error: $out/server.pem exists; move it away to issue a new one" >&2
  exit 1
fi

cn=${san#*:}
cn=${cn%%,*}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/O=kidneyfl consortium/CN=$cn" \
  -out "$tmp/server.csr"
printf '%s\n' \
  "basicConstraints=CA:FALSE" \
  "keyUsage=digitalSignature,keyEncipherment" \
  "extendedKeyUsage=serverAuth" \
  "subjectAltName=$san" >"$tmp/server.ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days "$days" -sha256 -extfile "$tmp/server.ext" \
  -out "$out/server.pem" 2>/dev/null
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "made SuperLink certificate: $out/server.pem for $san"
