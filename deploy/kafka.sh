#!/usr/bin/env bash
# Single-node Apache Kafka broker (KRaft, broker+controller in one JVM) from Maven Central.
#
#   deploy/kafka.sh up      fetch the jars (once, cached), format storage (once), start, wait ready
#   deploy/kafka.sh fetch   only fetch the jars; prints their directory (deploy/compose/images.sh
#                           puts them in an image)
#   deploy/kafka.sh version the Kafka version of deploy/kafka/pom.xml
#   deploy/kafka.sh down    stop the broker (SIGTERM, then SIGKILL after a timeout)
#   deploy/kafka.sh status  exit 0 if the broker serves requests, 3 otherwise
#   deploy/kafka.sh reset   down + wipe all data + up
#
# Env: INVOKER_CACHE (default ~/.cache/invoker)   downloaded jars
#      INVOKER_STATE (default /tmp/invoker-state) config, data, logs, pidfile
#      KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_HEAP (768m)
#      KAFKA_TIMEOUT (90)  seconds to wait for the broker to serve requests
#      INVOKER_PYTHON      a python with kafka-python (default: <repo>/.venv/bin/python)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
POM="$SCRIPT_DIR/kafka/pom.xml"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
[[ -n "$KAFKA_VERSION" ]] || { echo "[kafka] ERROR: no kafka.version in $POM" >&2; exit 1; }

CACHE_DIR="${INVOKER_CACHE:-$HOME/.cache/invoker}/kafka-$KAFKA_VERSION"
LIBS_DIR="$CACHE_DIR/libs"
STATE_DIR="${INVOKER_STATE:-/tmp/invoker-state}/kafka"
DATA_DIR="$STATE_DIR/data"
LOGS_DIR="$STATE_DIR/logs"
PID_FILE="$STATE_DIR/kafka.pid"
OUT_FILE="$LOGS_DIR/kafka.out"
SERVER_LOG="$LOGS_DIR/server.log"
PROPS="$STATE_DIR/server.properties"
LOG4J="$STATE_DIR/log4j2.properties"

PORT="${KAFKA_PORT:-9092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${KAFKA_HEAP:-768m}"
TIMEOUT="${KAFKA_TIMEOUT:-90}"
BOOTSTRAP="127.0.0.1:$PORT"

log() { echo "[kafka] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- processes
is_our_broker() { # pid -> true if it is a kafka.Kafka JVM running our server.properties
    local -a argv # read without forking: the fallback scan checks every process
    { mapfile -d '' argv <"/proc/$1/cmdline"; } 2>/dev/null || return 1
    [[ " ${argv[*]} " == *" kafka.Kafka $PROPS "* ]]
}

broker_pid() { pid_from_file "$PID_FILE" is_our_broker; }

# ---------------------------------------------------------------- readiness
pick_python() {
    local c
    for c in "${INVOKER_PYTHON:-}" "$REPO_DIR/.venv/bin/python" python3; do
        [[ -n "$c" ]] || continue
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import kafka' 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# one attempt: does the broker answer a metadata request through a real client?
broker_answers() {
    port_listening "$PORT" || return 1 # cheap gate: the client is slow to give up on a closed port
    if [[ -n "${PYTHON:-}" ]]; then
        timeout 20 "$PYTHON" - "$BOOTSTRAP" <<'EOF' >"$STATE_DIR/check.log" 2>&1
import sys
from kafka import KafkaAdminClient
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=5000,
                         client_id="invoker-deploy-check")
try:
    admin.list_topics()
finally:
    admin.close()
EOF
    fi
}

wait_ready() {
    local pid="$1" deadline=$((SECONDS + TIMEOUT))
    until broker_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail 40 "$OUT_FILE" "$SERVER_LOG"
            die "broker (pid $pid) exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail 40 "$OUT_FILE" "$SERVER_LOG"
            log "last readiness check ($STATE_DIR/check.log):"
            tail -n 5 "$STATE_DIR/check.log" >&2 2>/dev/null || true
            die "broker did not serve requests on $BOOTSTRAP within ${TIMEOUT}s (pid $pid still running)"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- install
ensure_tools() {
    local missing=()
    command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
    fi
}

ensure_jars() {
    if [[ -f "$LIBS_DIR/.complete" ]]; then
        return 0
    fi
    ensure_tools
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS_DIR"
    local t0=$SECONDS tmp="$CACHE_DIR/libs.tmp.$$"
    mkdir -p "$CACHE_DIR"
    rm -rf "$tmp"
    if ! (cd "$CACHE_DIR" && timeout 900 mvn -q -B -Dstyle.color=never -f "$POM" \
        dependency:copy-dependencies -DoutputDirectory="$tmp" >"$CACHE_DIR/mvn.log" 2>&1); then
        tail -n 40 "$CACHE_DIR/mvn.log" >&2 || true
        rm -rf "$tmp"
        die "mvn dependency:copy-dependencies failed (log: $CACHE_DIR/mvn.log)"
    fi
    [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"
    touch "$tmp/.complete"
    rm -rf "$LIBS_DIR"
    mv "$tmp" "$LIBS_DIR"
    log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- config
write_config() {
    mkdir -p "$STATE_DIR" "$DATA_DIR" "$LOGS_DIR"
    cat >"$PROPS" <<EOF
# generated by deploy/kafka.sh; rewritten on every start
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR
num.partitions=4
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
default.replication.factor=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=24
EOF
    cat >"$LOG4J" <<'EOF'
# generated by deploy/kafka.sh: log4j2 config for the broker and the storage tool
status = warn
name = invoker-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
}

java_opts() {
    echo "-Xms256m -Xmx$HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35"
    echo "-Djava.awt.headless=true -Dkafka.logs.dir=$LOGS_DIR -Dlog4j2.configurationFile=$LOG4J"
}

format_storage() {
    if [[ -f "$DATA_DIR/meta.properties" ]]; then
        return 0
    fi
    local cluster_id
    # A base64url UUID; one starting with "-" would be read as an option (1 in 64 formats).
    cluster_id="-"
    while [[ "$cluster_id" == -* ]]; do
        cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    done
    log "formatting storage in $DATA_DIR (cluster id $cluster_id)"
    # shellcheck disable=SC2046
    if ! timeout 120 java $(java_opts) -cp "$LIBS_DIR/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$PROPS" --ignore-formatted >"$LOGS_DIR/format.log" 2>&1; then
        tail -n 40 "$LOGS_DIR/format.log" >&2 || true
        die "kafka storage format failed (log: $LOGS_DIR/format.log)"
    fi
    [[ -f "$DATA_DIR/meta.properties" ]] || die "storage format did not write $DATA_DIR/meta.properties"
}

# ---------------------------------------------------------------- commands
cmd_up() {
    PYTHON="$(pick_python || true)"
    [[ -n "$PYTHON" ]] || log "WARNING: no python with kafka-python found; readiness = TCP port check only"
    local pid
    if pid="$(broker_pid)"; then
        wait_ready "$pid"
        log "already up (pid $pid) on $BOOTSTRAP; nothing to do"
        return 0
    fi
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        if port_listening "$p"; then
            ss -ltnp "sport = :$p" >&2 2>/dev/null || true
            die "port $p on 127.0.0.1 is already in use by another process (not our broker)"
        fi
    done
    ensure_jars
    command -v java >/dev/null 2>&1 || ensure_tools
    write_config
    format_storage
    local t0=$SECONDS
    log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (logs: $LOGS_DIR)"
    local marker
    marker="=== $(date -Is) starting kafka ==="
    echo "$marker" >>"$OUT_FILE"
    echo "$marker" >>"$SERVER_LOG" # so a failure's log tail is not mistaken for an older run's
    # shellcheck disable=SC2046
    (cd "$STATE_DIR" && exec setsid nohup java $(java_opts) -cp "$LIBS_DIR/*" kafka.Kafka "$PROPS" \
        >>"$OUT_FILE" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" >"$PID_FILE"
    wait_ready "$pid"
    log "up (pid $pid) on $BOOTSTRAP in $((SECONDS - t0))s"
}

cmd_down() { stop_service broker 30 "$PID_FILE" broker_pid; }

cmd_status() {
    PYTHON="$(pick_python || true)"
    mkdir -p "$STATE_DIR"
    local pid
    if pid="$(broker_pid)"; then
        if broker_answers; then
            log "up (pid $pid) on $BOOTSTRAP, Kafka $KAFKA_VERSION"
            return 0
        fi
        log "running (pid $pid) but not answering on $BOOTSTRAP"
        return 3
    fi
    log "down"
    return 3
}

cmd_reset() {
    cmd_down
    log "wiping data in $DATA_DIR"
    rm -rf "$DATA_DIR"
    cmd_up
}

case "${1:-}" in
    up) cmd_up ;;
    fetch)
        ensure_jars
        echo "$LIBS_DIR"
        ;;
    version) echo "$KAFKA_VERSION" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    *)
        echo "usage: $0 up|fetch|version|down|status|reset" >&2
        exit 2
        ;;
esac
