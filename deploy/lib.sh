# Shared by the deploy/ scripts (sourced; the caller defines log()).

# stop_process NAME PID GRACE_S: SIGTERM, wait up to GRACE_S, then SIGKILL.
stop_process() {
    local name=$1 pid=$2 grace=$3
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name did not stop within ${grace}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
}
