#!/usr/bin/env bash
# Bring up (or down) everything the invoker needs on this machine, in order:
#   1. Docker engine      deploy/docker-engine.sh  (installs docker.io + debootstrap if missing)
#   2. Kafka broker       deploy/kafka.sh          (127.0.0.1:${KAFKA_PORT:-9092})
#   3. pouchdb-server     deploy/pouchdb.sh        (127.0.0.1:${POUCHDB_PORT:-5984})
#   4. images             deploy/images.sh         (invoker-python-base:bookworm, invoker-action-python:latest)
#
#   deploy/services.sh up [--fresh]   start all (idempotent; --fresh wipes Kafka and pouchdb data)
#   deploy/services.sh down [--all]   stop pouchdb and Kafka; --all also stops the Docker engine
#                                     (only one that deploy/docker-engine.sh started)
#   deploy/services.sh status         status of each; exit 0 only if all are up
#
# Caches: ${INVOKER_CACHE:-~/.cache/invoker}; state, logs, pidfiles: ${INVOKER_STATE:-/tmp/invoker-state}
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "[services] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=deploy/lib.sh
source "$DEPLOY/lib.sh"

TIMINGS=()
step() { # step NAME CMD... : run, time it, stop on failure
    local name="$1" t0 rc=0
    shift
    t0=$(date +%s.%N)
    "$@" || rc=$?
    local dt
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((rc != 0)); then
        log "step '$name' FAILED after ${dt}s (exit $rc)"
        exit "$rc"
    fi
    log "step '$name' done in ${dt}s"
    TIMINGS+=("$(printf '%-14s %6ss' "$name" "$dt")")
}

summary() {
    local line
    log "timings:"
    for line in "${TIMINGS[@]}"; do
        log "  $line"
    done
}

cmd_up() {
    local fresh=""
    case "${1:-}" in
        "") ;;
        --fresh) fresh=1 ;;
        *) log "unknown option for up: $1"; exit 2 ;;
    esac
    local t0=$SECONDS
    step docker-engine "$DEPLOY/docker-engine.sh" up
    if [[ -n "$fresh" ]]; then
        step kafka "$DEPLOY/kafka.sh" reset
        step pouchdb "$DEPLOY/pouchdb.sh" up --fresh
    else
        step kafka "$DEPLOY/kafka.sh" up
        step pouchdb "$DEPLOY/pouchdb.sh" up
    fi
    step images "$DEPLOY/images.sh" build
    summary
    log "all services up in $((SECONDS - t0))s"
}

cmd_down() {
    local all=""
    case "${1:-}" in
        "") ;;
        --all) all=1 ;;
        *) log "unknown option for down: $1"; exit 2 ;;
    esac
    step pouchdb "$DEPLOY/pouchdb.sh" down
    step kafka "$DEPLOY/kafka.sh" down
    if [[ -n "$all" ]]; then
        step docker-engine "$DEPLOY/docker-engine.sh" down
    else
        log "leaving the Docker engine running (use 'down --all' to stop it)"
    fi
    summary
}

cmd_status() {
    local rc=0 img
    "$DEPLOY/docker-engine.sh" status || rc=1
    "$DEPLOY/kafka.sh" status || rc=1
    "$DEPLOY/pouchdb.sh" status || rc=1
    if docker_answers; then
        for img in invoker-python-base:bookworm invoker-action-python:latest; do
            if image_exists "$img"; then
                log "image $img present"
            else
                log "image $img MISSING"
                rc=1
            fi
        done
    fi
    return "$rc"
}

case "${1:-}" in
    up) cmd_up "${2:-}" ;;
    down) cmd_down "${2:-}" ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up [--fresh]|down [--all]|status" >&2
        exit 2
        ;;
esac
