#!/usr/bin/env bash
# Install (if needed) and start the Docker engine on a machine without systemd.
#
#   deploy/docker-engine.sh up      install docker.io + debootstrap if missing, start dockerd
#   deploy/docker-engine.sh down    stop the dockerd that THIS script started (pidfile)
#   deploy/docker-engine.sh status  exit 0 if `docker info` answers, 3 otherwise
#   deploy/docker-engine.sh stacks  have the running dockerd write its goroutine stacks
#                                   (SIGUSR1); prints the file's path (for an engine that
#                                   stopped answering: what its requests wait on)
#
# Env: INVOKER_STATE (default /tmp/invoker-state)  runtime state, log and pidfile
#      DOCKERD_TIMEOUT (default 60)                seconds to wait for `docker info`
set -euo pipefail

STATE_DIR="${INVOKER_STATE:-/tmp/invoker-state}/docker"
LOG_FILE="$STATE_DIR/dockerd.log"
PID_FILE="$STATE_DIR/dockerd.pid"
TIMEOUT="${DOCKERD_TIMEOUT:-60}"

log() { echo "[docker-engine] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# pid from our pidfile if that process is alive and really is dockerd
our_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    local -a argv
    { mapfile -d '' argv <"/proc/$pid/cmdline"; } 2>/dev/null || return 1
    [[ "${argv[0]:-}" == *dockerd ]] || return 1
    echo "$pid"
}

ensure_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    # debootstrap builds the base image (deploy/images.sh); install it in the same apt run
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if ((${#missing[@]})); then
        # with recommends, as on the machine where this was verified (apt-get install -y docker.io)
        apt_install --with-recommends "${missing[@]}"
    fi
    command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
    command -v docker >/dev/null 2>&1 || die "docker client missing"
}

wait_for_docker() {
    local pid="${1:-}" deadline=$((SECONDS + TIMEOUT))
    while ! docker_answers; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail 30 "$LOG_FILE"
            die "dockerd (pid $pid) exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail 30 "$LOG_FILE"
            die "docker info did not answer within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
}

cmd_up() {
    ensure_packages
    if docker_answers; then
        log "docker engine already answers; nothing to do"
        return 0
    fi
    mkdir -p "$STATE_DIR"
    local pid
    if pid="$(our_pid)"; then
        log "dockerd (pid $pid, ours) is running but not answering yet; waiting"
        wait_for_docker "$pid"
        log "docker engine up"
        return 0
    fi
    if pgrep -x dockerd >/dev/null 2>&1; then
        # someone else started one; a second dockerd would fail on its lock: wait for it
        log "a dockerd not started by this script is running; waiting for it to answer"
        wait_for_docker ""
        log "docker engine up"
        return 0
    fi
    log "starting dockerd (log: $LOG_FILE)"
    local t0=$SECONDS
    {
        echo "=== $(date -Is) starting dockerd ==="
    } >>"$LOG_FILE"
    setsid nohup dockerd --storage-driver=overlay2 >>"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
    wait_for_docker "$pid"
    log "docker engine up (pid $pid) in $((SECONDS - t0))s"
}

cmd_down() {
    local pid
    if ! pid="$(our_pid)"; then
        rm -f "$PID_FILE"
        if docker_answers; then
            log "the running docker engine was not started by this script; leaving it alone"
        else
            log "no dockerd started by this script is running"
        fi
        return 0
    fi
    log "stopping dockerd (pid $pid)"
    stop_process dockerd "$pid" 45
    rm -f "$PID_FILE"
    log "dockerd stopped"
}

cmd_status() {
    local pid
    if docker_answers; then
        if pid="$(our_pid)"; then
            log "up (dockerd pid $pid, started by this script)"
        else
            log "up (dockerd not started by this script)"
        fi
        return 0
    fi
    log "down"
    return 3
}

cmd_stacks() {
    local pid
    pid="$(our_pid || pgrep -xo dockerd)" || die "no dockerd is running"
    local dir=/var/run/docker newest=""  # dockerd's default --exec-root, as started here
    local before
    before="$(ls -t "$dir"/goroutine-stacks-*.log 2>/dev/null | head -1 || true)"
    kill -USR1 "$pid" || die "could not signal dockerd (pid $pid)"
    for _ in $(seq 50); do  # dockerd writes the file within a second, even when wedged
        newest="$(ls -t "$dir"/goroutine-stacks-*.log 2>/dev/null | head -1 || true)"
        [[ -n "$newest" && "$newest" != "$before" ]] && break
        newest=""
        sleep 0.1
    done
    [[ -n "$newest" ]] || die "dockerd (pid $pid) wrote no goroutine stacks to $dir within 5s"
    echo "$newest"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    stacks) cmd_stacks ;;
    *)
        echo "usage: $0 up|down|status|stacks" >&2
        exit 2
        ;;
esac
