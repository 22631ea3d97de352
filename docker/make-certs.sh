#!/usr/bin/env bash
# The consortium's TLS material for the SuperLink, made with openssl.
#
#   docker/make-certs.sh OUT_DIR [SAN] [CA_DIR]
#
# CA_DIR (default: OUT_DIR followed by "-ca", e.g. certs-ca/) holds the
# consortium's certificate authority:
#   ca.key       CA private key: keep this folder OFF the coordinator (an
#                offline machine or the consortium's key custody); whoever
#                holds it can mint a SuperLink certificate the hospitals trust
#   ca.crt       CA certificate
# OUT_DIR receives what the coordinator needs, and nothing more:
#   ca.crt       the CA certificate: give it to every hospital (public)
#   server.pem   SuperLink certificate, signed by the CA
#   server.key   SuperLink private key: stays on the coordinator host
# SAN is the SuperLink's address as the hospitals and operators dial it, in
# openssl's subjectAltName syntax (default "IP:127.0.0.1,DNS:localhost"), for
# example "DNS:fl.consortium.example,IP:127.0.0.1".
#
# An existing CA in CA_DIR is reused (so hospitals' ca.crt stays valid when
# the server certificate is renewed); existing files are never overwritten.
# Nothing here is a hospital's secret: hospitals make their own node keys
# (kidneyfl site keygen) and send only the public half.
set -euo pipefail

out=${1:?usage: make-certs.sh OUT_DIR [SAN] [CA_DIR]}
san=${2:-IP:127.0.0.1,DNS:localhost}
out=${out%/}
ca=${3:-${out}-ca}
ca=${ca%/}
days=${KIDNEYFL_CERT_DAYS:-825}

if [[ "$(cd "$(dirname "$out")" 2>/dev/null && pwd)/$(basename "$out")" == \
      "$(cd "$(dirname "$ca")" 2>/dev/null && pwd)/$(basename "$ca")" ]]; then
  echo "error: CA_DIR and OUT_DIR are the same folder; the CA key must not sit with the coordinator's files" >&2
  exit 2
fi
if [[ -f "$out/ca.key" ]]; then
  echo "error: $out/ca.key is the CA's private key in the coordinator's folder (an older layout)." >&2
  echo "       Move it to the CA folder and keep that off the coordinator:" >&2
  echo "         mkdir -p '$ca' && mv '$out/ca.key' '$ca/' && cp '$out/ca.crt' '$ca/'" >&2
  exit 2
fi
mkdir -p "$out" "$ca"
umask 077

if [[ ! -f "$ca/ca.key" ]]; then
  openssl genrsa -out "$ca/ca.key" 4096 2>/dev/null
  openssl req -new -x509 -key "$ca/ca.key" -sha256 -days "$days" \
    -subj "/O=kidneyfl consortium/CN=kidneyfl consortium CA" -out "$ca/ca.crt"
  chmod 644 "$ca/ca.crt"
  echo "made consortium CA in $ca (private key $ca/ca.key: keep this folder off the coordinator)"
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
openssl x509 -req -in "$tmp/server.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" \
  -CAserial "$ca/ca.srl" -CAcreateserial -days "$days" -sha256 \
  -extfile "$tmp/server.ext" -out "$out/server.pem" 2>/dev/null
cp "$ca/ca.crt" "$out/ca.crt"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "made SuperLink certificate: $out/server.pem for $san (with $out/ca.crt; no CA key in $out)"
