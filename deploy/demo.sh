#!/usr/bin/env bash
# `make demo`: run the daemon against the local Kafka and an embedded SQLite store under a
# ~30 s load-generator run, print the report, plot the run (DEMO_PLOT.png and an offline
# DEMO_PLOT.html, see README "Reading the plots"), then stop the daemon with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${INVOKER_PYTHON:-.venv/bin/python}
STATE=${DEMO_STATE:-/tmp/invoker-demo}
DURATION=${DEMO_DURATION:-30}
RATE=${DEMO_RATE:-40}
PORT=${DEMO_METRICS_PORT:-9180}
PLOT=${DEMO_PLOT:-$STATE/demo}
mkdir -p "$STATE"
tag=$(date +%s)
export INVOKER_KAFKA_BOOTSTRAP=127.0.0.1:9092
export INVOKER_STORE_URL="sqlite:///$STATE/records.sqlite3"
export INVOKER_FEED_TOPIC="demo-$tag-activations" INVOKER_COMPLETIONS_TOPIC="demo-$tag-completions"
export INVOKER_DEAD_LETTER_TOPIC="demo-$tag-dead-letters" INVOKER_GROUP_ID="demo-$tag"
export INVOKER_INVOKER_ID=demo-invoker INVOKER_METRICS_PORT=$PORT
# 16 containers of 128 MB: enough for each of the five demo actions to keep warm containers;
# five prewarmed ones, so that each action's first activation needs only /init.
PREWARM=5
export INVOKER_PREWARM="{\"python:3\": $PREWARM}" INVOKER_PREWARM_MEMORY_MB=128
export INVOKER_DEFAULT_MEMORY_MB=128 INVOKER_USER_MEMORY_MB=2048

"$PY" -m invoker.cli run >"$STATE/daemon.log" 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true' EXIT
fail() { echo "$1; log:" >&2; tail -20 "$STATE/daemon.log" >&2; exit 1; }
up=""
for _ in $(seq 1 150); do
  if curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null; then up=1; break; fi
  kill -0 $daemon 2>/dev/null || fail "daemon exited"
  sleep 0.2
done
# the loop only ends early on an answer: otherwise the daemon is alive but never became healthy
[[ -n "$up" ]] || fail "daemon (pid $daemon) did not answer http://127.0.0.1:$PORT/healthz within ~30s"
echo "daemon up (pid $daemon, metrics http://127.0.0.1:$PORT/metrics, log $STATE/daemon.log)" >&2
# The load starts on a warm pool: wait (bounded) for the prewarmed containers.
for _ in $(seq 1 150); do
  ready=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '$1 == "invoker_prewarmed_containers" {print int($2)}')
  [[ "${ready:-0}" -ge $PREWARM ]] && break
  sleep 0.2
done
echo "containers ready: ${ready:-0} of $PREWARM prewarmed" >&2
echo "worst-case buffer: $(grep -o '"worst_case_buffered_records": [0-9]*, "worst_case_buffered_bytes": [0-9]*' "$STATE/daemon.log" | head -1)" >&2

status=0
"$PY" -m invoker.cli loadgen --duration "$DURATION" --rate "$RATE" \
  --action echo --action sleep:20 --action cpu:5 --action error --action logs:5 \
  --metrics-url "http://127.0.0.1:$PORT/metrics" --plot "$PLOT" || status=$?

kill -TERM $daemon
wait $daemon || status=$?
trap - EXIT
echo "daemon stopped cleanly (exit $status)" >&2
[[ -f "$PLOT.png" ]] && echo "plot: $PLOT.png (and $PLOT.html, offline)" >&2
exit $status
