#!/usr/bin/env bash
# Build the Docker images without any registry.
#
#   deploy/images.sh [build]   (a) invoker-python-base:bookworm — debootstrap'ed Debian minbase
#                                  with python3, imported with `docker import`; skipped when the
#                                  image exists, re-imported from the cached rootfs tarball when
#                                  only the image was deleted
#                              (b) invoker-action-python:latest — `docker build` of
#                                  deploy/runtime/python (every time; the layer cache makes it fast)
#                              (c) invoker-action-actionloop:latest — deploy/runtime/actionloop,
#                                  an ActionLoop-style runtime the tests run hardened (no pip,
#                                  no network: a few seconds)
#   deploy/images.sh clean     remove the three images (the cached rootfs tarball stays)
#
# Env: INVOKER_CACHE (default ~/.cache/invoker)   the rootfs tarball
#      INVOKER_STATE (default /tmp/invoker-state) build logs
#      DEBIAN_MIRROR   override the mirror (default: the host's apt source for bookworm)
# Needs a running Docker engine (deploy/docker-engine.sh up).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUITE=bookworm
BASE_IMAGE="invoker-python-base:$SUITE"
ACTION_IMAGE="invoker-action-python:latest"
ACTION_CONTEXT="$SCRIPT_DIR/runtime/python"
ACTIONLOOP_IMAGE="invoker-action-actionloop:latest"
ACTIONLOOP_CONTEXT="$SCRIPT_DIR/runtime/actionloop"
INCLUDE="python3,ca-certificates"
CACHE_DIR="${INVOKER_CACHE:-$HOME/.cache/invoker}/images"
# bump the suffix when the debootstrap command changes, so a stale tarball is not reused
ROOTFS_TAR="$CACHE_DIR/python-base-$SUITE-v1.tar"
STATE_DIR="${INVOKER_STATE:-/tmp/invoker-state}/images"

log() { echo "[images] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# shellcheck source=deploy/lib.sh
source "$SCRIPT_DIR/lib.sh"
trap cleanup_rootfs EXIT

build_base() {
    debootstrap_base "$BASE_IMAGE" "$ROOTFS_TAR" "$SUITE" "$INCLUDE" \
        'python3 -c "import ssl, sys; print(\"python\", sys.version.split()[0])"' 'CMD ["python3"]'
}

# build_runtime IMAGE CONTEXT: docker build of an action runtime on the base image
build_runtime() {
    local image=$1 context=$2
    [[ -f "$context/Dockerfile" ]] || die "no Dockerfile in $context"
    mkdir -p "$STATE_DIR"
    local t0=$SECONDS logf="$STATE_DIR/build-${image%%:*}.log"
    log "docker build -t $image $context (log: $logf)"
    # legacy builder: there is no buildx here
    if ! DOCKER_BUILDKIT=0 timeout 900 docker build -t "$image" "$context" >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2 || true
        die "docker build of $image failed"
    fi
    log "$image built in $((SECONDS - t0))s ($(docker image inspect -f '{{.Id}}' "$image" | cut -c1-19))"
}

cmd_build() {
    docker_answers || die "the Docker engine does not answer; run deploy/docker-engine.sh up first"
    build_base
    build_runtime "$ACTION_IMAGE" "$ACTION_CONTEXT"
    build_runtime "$ACTIONLOOP_IMAGE" "$ACTIONLOOP_CONTEXT"
}

cmd_clean() {
    local img
    for img in "$ACTION_IMAGE" "$ACTIONLOOP_IMAGE" "$BASE_IMAGE"; do
        if image_exists "$img"; then
            log "removing $img"
            docker image rm "$img" >/dev/null || die "could not remove $img"
        fi
    done
}

case "${1:-build}" in
    build) cmd_build ;;
    clean) cmd_clean ;;
    *)
        echo "usage: $0 [build|clean]" >&2
        exit 2
        ;;
esac
