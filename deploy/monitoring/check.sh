#!/usr/bin/env bash
# Check the monitoring files with promtool: prometheus.yml and the rules.yml it loads are valid
# (`promtool check config` checks both), every alert behaves as rules_test.yml says
# (`promtool test rules`), and every query of grafana-dashboard.json is valid PromQL (checked as
# recording rules, Grafana's variables replaced). Exits non-zero on the first failure.
#
#   deploy/monitoring/check.sh
#
# promtool: $PROMTOOL, else the one on PATH, else the one from Debian's `prometheus` package,
# extracted into $INVOKER_CACHE/promtool (default ~/.cache/invoker). The package is downloaded
# (apt-get download) and unpacked rather than installed: installing it would also enable and
# start a Prometheus server on this machine.
#
# Bounded: every step that may wait has a timeout; fetching promtool takes at most
# 2 x APT_DOWNLOAD_TIMEOUT_S + APT_UPDATE_TIMEOUT_S (480 s), each of the four promtool runs
# PROMTOOL_TIMEOUT_S (60 s): 720 s in all (tests/test_monitoring_rules.py allows 900 s).
set -euo pipefail

MONITORING_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${INVOKER_CACHE:-${HOME:-/tmp}/.cache/invoker}/promtool"
APT_DOWNLOAD_TIMEOUT_S=120
APT_UPDATE_TIMEOUT_S=240
PROMTOOL_TIMEOUT_S=60

log() { echo "[monitoring-check] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
WORK="$(mktemp -d)" # scratch, removed at exit whatever happens
trap 'rm -rf "$WORK"' EXIT

apt_download() {
    (cd "$1" && timeout "$APT_DOWNLOAD_TIMEOUT_S" apt-get download -q prometheus >"$1/apt.log" 2>&1)
}

# fetch_promtool: unpack Debian's prometheus package into CACHE_DIR (the package lists are
# refreshed first when apt cannot download it)
fetch_promtool() {
    local debs work="$WORK/apt"
    mkdir -p "$work"
    if [[ $EUID -eq 0 ]] && id -u _apt >/dev/null 2>&1; then
        # apt run by root downloads as its sandbox user _apt: it must reach and write the
        # directory (else apt falls back to downloading as root, with a warning)
        chmod 0755 "$WORK"
        chown _apt "$work"
    fi
    if ! apt_download "$work"; then
        [[ $EUID -eq 0 ]] || {
            cat "$work/apt.log" >&2
            die "apt-get download prometheus failed, and refreshing the package lists needs" \
                "root: set PROMTOOL=/path/to/promtool (or put promtool on PATH)"
        }
        log "apt-get download prometheus failed; refreshing the package lists"
        DEBIAN_FRONTEND=noninteractive timeout "$APT_UPDATE_TIMEOUT_S" \
            apt-get -o DPkg::Lock::Timeout=60 update -q >&2 ||
            die "apt-get update failed: set PROMTOOL=/path/to/promtool (or put promtool on PATH)"
        apt_download "$work" || {
            cat "$work/apt.log" >&2
            die "apt-get download prometheus failed: set PROMTOOL=/path/to/promtool"
        }
    fi
    debs=("$work"/prometheus_*.deb)
    [[ ${#debs[@]} -eq 1 && -f "${debs[0]}" ]] || die "apt-get download left ${debs[*]}"
    local deb="${debs[0]}"
    dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
    mkdir -p "$CACHE_DIR"
    mv "$work/root/usr/bin/promtool" "$CACHE_DIR/promtool.tmp"
    mv "$CACHE_DIR/promtool.tmp" "$CACHE_DIR/promtool" # atomic: a cached promtool is whole
    log "promtool of prometheus $(dpkg-deb -f "$deb" Version) unpacked into $CACHE_DIR"
}

# find_promtool: sets PROMTOOL
find_promtool() {
    if [[ -n "${PROMTOOL:-}" ]]; then
        return
    elif command -v promtool >/dev/null 2>&1; then
        PROMTOOL="$(command -v promtool)"
    else
        [[ -x "$CACHE_DIR/promtool" ]] || fetch_promtool
        PROMTOOL="$CACHE_DIR/promtool"
    fi
}

run_promtool() { timeout "$PROMTOOL_TIMEOUT_S" "$PROMTOOL" "$@"; }

find_promtool
log "$(run_promtool --version 2>&1 | head -n1)"
cd "$MONITORING_DIR"
run_promtool check config prometheus.yml
run_promtool test rules rules_test.yml
python3 - grafana-dashboard.json >"$WORK/dashboard-rules.yml" <<'EOF'
import json, sys

with open(sys.argv[1]) as fh:
    dashboard = json.load(fh)
# what Grafana substitutes before it sends a query
variables = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$job": ".*",
             "$instance": ".*"}
print("groups:\n  - name: grafana-dashboard\n    rules:")
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for name, value in variables.items():
            expr = expr.replace(name, value)
        record = f"panel{panel['id']}_{target['refId']}"
        print(f"      - record: {record}\n        expr: {json.dumps(expr)}")
EOF
echo "Checking the queries of grafana-dashboard.json"
run_promtool check rules "$WORK/dashboard-rules.yml"
