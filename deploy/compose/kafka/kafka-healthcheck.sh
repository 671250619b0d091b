#!/bin/bash
# Broker API check without a JVM: send an ApiVersions (v0) request to 127.0.0.1:${1:-9092}
# and succeed only on a response with our correlation id and error code 0 (NONE). The broker
# answers on its data-plane listener only once it has started up (caught up with the metadata
# log and been unfenced), so this is "the broker serves requests", not just "the port is open".
set -uo pipefail
port="${1:-9092}"
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
# size=12 | api_key=18 (ApiVersions) | api_version=0 | correlation_id=0x494e564b | client_id="hc"
printf '\x00\x00\x00\x0c\x00\x12\x00\x00\x49\x4e\x56\x4b\x00\x02hc' >&3 || exit 1
resp="$(timeout 5 head -c 10 <&3 | od -An -v -tx1 | tr -d ' \n')"
exec 3>&-
# 4 bytes size, 4 bytes correlation id, 2 bytes error code
[[ "${resp:8:8}" == "494e564b" && "${resp:16:4}" == "0000" ]] || {
    echo "unexpected ApiVersions answer: '${resp}'" >&2
    exit 1
}
echo "ok: ApiVersions answered on 127.0.0.1:$port"
