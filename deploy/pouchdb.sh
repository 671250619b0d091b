#!/usr/bin/env bash
# CouchDB-compatible store: pouchdb-server (npm) on 127.0.0.1.
#
#   deploy/pouchdb.sh up [--fresh]  install (once, cached), start, wait until it answers;
#                                   --fresh wipes the data first
#   deploy/pouchdb.sh install       only install it; prints the install dir (deploy/compose/images.sh
#                                   puts it in an image)
#   deploy/pouchdb.sh down          stop it
#   deploy/pouchdb.sh status        exit 0 if it answers, 3 otherwise
#   deploy/pouchdb.sh reset         down + wipe data + up
#
# Env: INVOKER_CACHE (default ~/.cache/invoker)   npm install dir
#      INVOKER_STATE (default /tmp/invoker-state) data, config.json, logs, pidfile
#      POUCHDB_PORT (5984), POUCHDB_LOG_LEVEL (info), POUCHDB_TIMEOUT (30 s)
set -euo pipefail

POUCHDB_VERSION=4.2.0
CACHE_DIR="${INVOKER_CACHE:-$HOME/.cache/invoker}/pouchdb-server-$POUCHDB_VERSION"
BIN="$CACHE_DIR/node_modules/.bin/pouchdb-server"
STATE_DIR="${INVOKER_STATE:-/tmp/invoker-state}/pouchdb"
DATA_DIR="$STATE_DIR/data"
CONFIG="$STATE_DIR/config.json"
LOG_FILE="$STATE_DIR/pouchdb.log"
OUT_FILE="$STATE_DIR/pouchdb.out"
PID_FILE="$STATE_DIR/pouchdb.pid"
PORT="${POUCHDB_PORT:-5984}"
LOG_LEVEL="${POUCHDB_LOG_LEVEL:-info}"
TIMEOUT="${POUCHDB_TIMEOUT:-30}"
URL="http://127.0.0.1:$PORT/"

log() { echo "[pouchdb] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

answers() { curl -sf -m 3 -o /dev/null "$URL"; }

is_ours() { # pid -> true if it is a pouchdb-server using our config file
    local -a argv # read without forking: the fallback scan checks every process
    { mapfile -d '' argv <"/proc/$1/cmdline"; } 2>/dev/null || return 1
    [[ " ${argv[*]} " == *pouchdb-server*" --config $CONFIG "* ]]
}

server_pid() { pid_from_file "$PID_FILE" is_ours; }

ensure_installed() {
    if [[ -f "$CACHE_DIR/.complete" && -x "$BIN" ]]; then
        return 0
    fi
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        die "node and npm are required (apt-get install nodejs npm)"
    fi
    log "installing pouchdb-server@$POUCHDB_VERSION from npm into $CACHE_DIR"
    local t0=$SECONDS tmp="$CACHE_DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    echo '{"name":"invoker-pouchdb-server","private":true}' >"$tmp/package.json"
    # --ignore-scripts: the only install scripts are leveldown's (node-gyp-build, which finds its
    # bundled linux-x64 prebuild at run time anyway) and sqlite3's source build (~70 s of CPU,
    # only needed for --sqlite, which we do not use).
    if ! (cd "$tmp" && timeout 600 npm install --no-audit --no-fund --loglevel=error --ignore-scripts \
        "pouchdb-server@$POUCHDB_VERSION" >"$tmp/npm.log" 2>&1); then
        tail -n 40 "$tmp/npm.log" >&2 || true
        die "npm install pouchdb-server@$POUCHDB_VERSION failed (log: $tmp/npm.log)"
    fi
    (cd "$tmp" && node -e 'require("leveldown")') ||
        die "leveldown (the storage backend) does not load on this machine"
    touch "$tmp/.complete"
    rm -rf "$CACHE_DIR"
    mv "$tmp" "$CACHE_DIR"
    log "installed in $((SECONDS - t0))s"
}

write_config() {
    mkdir -p "$STATE_DIR" "$DATA_DIR"
    # keep what pouchdb-server stored there (its uuid, /_config changes); force the log file
    # into the state dir (its default is ./log.txt in the cwd), and do not also tail it to
    # stdout (the --no-stdout-logs flag is parsed by nomnom as a negated "stdout-logs" and has
    # no effect; the config key works)
    node -e '
        const fs = require("fs");
        const [file, logFile, level] = process.argv.slice(1);
        let c = {};
        try { c = JSON.parse(fs.readFileSync(file, "utf8")); } catch (e) {}
        c.log = Object.assign(c.log || {}, { file: logFile, level: level });
        c.pouchdb_server = Object.assign(c.pouchdb_server || {}, { "no-stdout-logs": true });
        fs.writeFileSync(file, JSON.stringify(c, null, 2) + "\n");
    ' "$CONFIG" "$LOG_FILE" "$LOG_LEVEL"
}

wait_ready() {
    local pid="$1" deadline=$((SECONDS + TIMEOUT))
    until answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail 30 "$OUT_FILE" "$LOG_FILE"
            die "pouchdb-server (pid $pid) exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail 30 "$OUT_FILE" "$LOG_FILE"
            die "pouchdb-server did not answer on $URL within ${TIMEOUT}s (pid $pid still running)"
        fi
        sleep 0.3
    done
}

cmd_up() {
    local fresh="${1:-}"
    if [[ "$fresh" == "--fresh" ]]; then
        cmd_down
        log "wiping data in $DATA_DIR"
        rm -rf "$DATA_DIR"
    elif [[ -n "$fresh" ]]; then
        die "unknown option for up: $fresh"
    fi
    local pid
    if pid="$(server_pid)"; then
        wait_ready "$pid"
        log "already up (pid $pid) on $URL; nothing to do"
        return 0
    fi
    if port_listening "$PORT"; then
        ss -ltnp "sport = :$PORT" >&2 2>/dev/null || true
        die "port $PORT on 127.0.0.1 is already in use by another process (not our pouchdb-server)"
    fi
    ensure_installed
    write_config
    local t0=$SECONDS
    log "starting pouchdb-server $POUCHDB_VERSION on $URL (data: $DATA_DIR, log: $LOG_FILE)"
    echo "=== $(date -Is) starting pouchdb-server ===" >>"$OUT_FILE"
    # cwd = state dir, so nothing it writes relative to the cwd lands elsewhere
    (cd "$STATE_DIR" && exec setsid nohup "$BIN" --host 127.0.0.1 --port "$PORT" --dir "$DATA_DIR/" \
        --config "$CONFIG" >>"$OUT_FILE" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" >"$PID_FILE"
    wait_ready "$pid"
    log "up (pid $pid) on $URL in $((SECONDS - t0))s"
}

cmd_down() { stop_service pouchdb-server 15 "$PID_FILE" server_pid; }

cmd_status() {
    local pid
    if pid="$(server_pid)"; then
        if answers; then
            log "up (pid $pid) on $URL"
            return 0
        fi
        log "running (pid $pid) but not answering on $URL"
        return 3
    fi
    if answers; then
        log "something answers on $URL but it is not our pouchdb-server"
        return 3
    fi
    log "down"
    return 3
}

case "${1:-}" in
    up) cmd_up "${2:-}" ;;
    install)
        ensure_installed
        echo "$CACHE_DIR"
        ;;
    down) cmd_down ;;
    status) cmd_status ;;
    reset) cmd_up --fresh ;;
    *)
        echo "usage: $0 up [--fresh]|install|down|status|reset" >&2
        exit 2
        ;;
esac
