#!/usr/bin/env bash
# Build the Docker images without any registry.
#
#   deploy/images.sh [build]   (a) invoker-python-base:bookworm — debootstrap'ed Debian minbase
#                                  with python3, imported with `docker import`; skipped when the
#                                  image exists, re-imported from the cached rootfs tarball when
#                                  only the image was deleted
#                              (b) invoker-action-python:latest — `docker build` of
#                                  deploy/runtime/python (every time; the layer cache makes it fast)
#   deploy/images.sh clean     remove both images (the cached rootfs tarball stays)
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
INCLUDE="python3,ca-certificates"
CACHE_DIR="${INVOKER_CACHE:-$HOME/.cache/invoker}/images"
# bump the suffix when the debootstrap command changes, so a stale tarball is not reused
ROOTFS_TAR="$CACHE_DIR/python-base-$SUITE-v1.tar"
STATE_DIR="${INVOKER_STATE:-/tmp/invoker-state}/images"

log() { echo "[images] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local m=""
    # deb822 sources: the URIs of the first "deb" stanza whose Suites list the plain suite
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        m="$(awk -v suite="$SUITE" '
            function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "" && !found) { split(uris, u, " "); print u[1]; found = 1 } types = suites = uris = "" }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
            END { flush() }
        ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    fi
    # one-line sources: deb [opts] URI SUITE COMPONENTS...
    if [[ -z "$m" && -f /etc/apt/sources.list ]]; then
        m="$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list |
            awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }')"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null 2>&1 && return 0
    log "installing debootstrap (apt-get)"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
        die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -q debootstrap >&2 || die "apt-get install debootstrap failed"
}

ROOTFS_TMP=""
cleanup_mounts_only() {
    # debootstrap may leave /proc, /sys or device bind mounts behind when it fails
    [[ -n "$ROOTFS_TMP" ]] || return 0
    local mnt
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET 2>/dev/null | grep -F "$ROOTFS_TMP/" | sort -r)
}
cleanup_rootfs() {
    [[ -n "$ROOTFS_TMP" && -d "$ROOTFS_TMP" ]] || return 0
    cleanup_mounts_only
    rm -rf --one-file-system "$ROOTFS_TMP" || log "WARNING: could not remove $ROOTFS_TMP"
    ROOTFS_TMP=""
}
trap cleanup_rootfs EXIT

build_rootfs_tar() {
    ensure_debootstrap
    mkdir -p "$CACHE_DIR" "$STATE_DIR"
    local mirror t0=$SECONDS
    mirror="$(debian_mirror)"
    ROOTFS_TMP="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    log "debootstrap --variant=minbase --include=$INCLUDE $SUITE from $mirror (log: $STATE_DIR/debootstrap.log)"
    if ! timeout 1200 debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS_TMP" "$mirror" \
        >"$STATE_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$STATE_DIR/debootstrap.log" >&2 || true
        [[ -f "$ROOTFS_TMP/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOTFS_TMP/debootstrap/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    [[ -x "$ROOTFS_TMP/usr/bin/python3" ]] || die "debootstrap finished but the rootfs has no python3"
    # drop downloaded packages and index files: nothing in the image runs apt
    rm -rf "$ROOTFS_TMP"/var/cache/apt/archives/*.deb "$ROOTFS_TMP"/var/lib/apt/lists/* \
        "$ROOTFS_TMP"/var/cache/apt/*.bin "$ROOTFS_TMP"/debootstrap
    cleanup_mounts_only
    log "packing the rootfs into $ROOTFS_TAR"
    tar --numeric-owner --one-file-system -C "$ROOTFS_TMP" -cf "$ROOTFS_TAR.tmp" . ||
        die "tar of the rootfs failed"
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    cleanup_rootfs
    log "rootfs built in $((SECONDS - t0))s ($(du -h "$ROOTFS_TAR" | cut -f1))"
}

build_base() {
    if image_exists "$BASE_IMAGE"; then
        log "$BASE_IMAGE exists; skipping"
        return 0
    fi
    [[ -s "$ROOTFS_TAR" ]] || build_rootfs_tar
    local t0=$SECONDS
    log "importing $ROOTFS_TAR as $BASE_IMAGE"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "debootstrap --variant=minbase --include=$INCLUDE $SUITE" \
        - "$BASE_IMAGE" <"$ROOTFS_TAR" >/dev/null || die "docker import failed"
    local v
    v="$(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print(sys.version.split()[0])')" ||
        die "$BASE_IMAGE was imported but cannot run python3"
    log "$BASE_IMAGE imported in $((SECONDS - t0))s (python $v)"
}

build_action() {
    [[ -f "$ACTION_CONTEXT/Dockerfile" ]] || die "no Dockerfile in $ACTION_CONTEXT"
    mkdir -p "$STATE_DIR"
    local t0=$SECONDS logf="$STATE_DIR/build-action-python.log"
    log "docker build -t $ACTION_IMAGE $ACTION_CONTEXT (log: $logf)"
    # legacy builder: there is no buildx here
    if ! DOCKER_BUILDKIT=0 timeout 900 docker build -t "$ACTION_IMAGE" "$ACTION_CONTEXT" >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2 || true
        die "docker build of $ACTION_IMAGE failed"
    fi
    log "$ACTION_IMAGE built in $((SECONDS - t0))s ($(docker image inspect -f '{{.Id}}' "$ACTION_IMAGE" | cut -c1-19))"
}

cmd_build() {
    timeout 10 docker info >/dev/null 2>&1 ||
        die "the Docker engine does not answer; run deploy/docker-engine.sh up first"
    build_base
    build_action
}

cmd_clean() {
    local img
    for img in "$ACTION_IMAGE" "$BASE_IMAGE"; do
        if image_exists "$img"; then
            log "removing $img"
            docker image rm "$img" >/dev/null || die "could not remove $img"
        fi
    done
}

case "${1:-build}" in
    build | up) cmd_build ;;
    clean) cmd_clean ;;
    *)
        echo "usage: $0 [build|clean]" >&2
        exit 2
        ;;
esac
