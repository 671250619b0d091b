#!/usr/bin/env bash
# Build every image the compose stack needs, with no container registry.
#
#   deploy/compose/images.sh [build]   build what is missing / changed (see below)
#   deploy/compose/images.sh bases     only the base images (python/action, java, node, prometheus)
#   deploy/compose/images.sh clean     remove the images built here (the caches stay)
#
# What it builds (the bases only when missing; the rest every time, the layer cache makes an
# unchanged rebuild take seconds):
#   invoker-python-base:bookworm,     by deploy/images.sh (debootstrap, python3; only if missing)
#   invoker-action-python:latest      and the action runtime the invoker starts
#   invoker-java-base:bookworm        debootstrap minbase + openjdk-17-jre-headless, docker import
#   invoker-node-base:bookworm        debootstrap minbase + nodejs (Debian's node 18)
#   invoker-local/invoker:latest      deploy/compose/invoker.Dockerfile; the project and its
#                                     dependencies as wheels built on this host (pip inside
#                                     `docker build` cannot reach PyPI), installed --no-index
#   invoker-local/kafka:latest        deploy/compose/kafka/: the Kafka broker jars of
#                                     deploy/kafka/pom.xml (the cache deploy/kafka.sh fills)
#   invoker-local/couchdb:latest      deploy/compose/couchdb/: pouchdb-server (the CouchDB API)
#                                     from the npm install deploy/pouchdb.sh caches
#   invoker-prometheus-base:bookworm  debootstrap minbase + prometheus (Debian's 2.42)
#   invoker-local/prometheus:latest   deploy/monitoring/prometheus.Dockerfile (profile monitoring)
#
# Env: INVOKER_CACHE (default ~/.cache/invoker)    rootfs tarballs, jars, node_modules, wheels
#      INVOKER_STATE (default /tmp/invoker-state)  build logs
#      DEBIAN_MIRROR   override the Debian mirror (default: the host's apt source for bookworm)
#      INVOKER_PYTHON  the python whose pip builds the wheels (default <repo>/.venv/bin/python)
# Needs a running Docker engine (deploy/docker-engine.sh up). Uses the legacy builder (no buildx).
set -euo pipefail

COMPOSE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$COMPOSE_DIR/../.." && pwd)"
SUITE=bookworm
CACHE_ROOT="${INVOKER_CACHE:-$HOME/.cache/invoker}"
IMAGES_CACHE="$CACHE_ROOT/images"
STATE_DIR="${INVOKER_STATE:-/tmp/invoker-state}/compose-images"

PY_BASE="invoker-python-base:$SUITE"
JAVA_BASE="invoker-java-base:$SUITE"
NODE_BASE="invoker-node-base:$SUITE"
INVOKER_IMAGE="invoker-local/invoker:latest"
KAFKA_IMAGE="invoker-local/kafka"
COUCH_IMAGE="invoker-local/couchdb:latest"
PROM_BASE="invoker-prometheus-base:$SUITE"
PROM_IMAGE="invoker-local/prometheus:latest"

WHEEL_CACHE="$CACHE_ROOT/compose-wheels/cp311-manylinux-x86_64"
WHEEL_STAGE="$COMPOSE_DIR/wheels" # inside the repo: the Dockerfile's context is the repo root

log() { echo "[compose-images] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=deploy/lib.sh
source "$REPO_DIR/deploy/lib.sh"
trap cleanup_rootfs EXIT

TIMINGS=()
step() { # step NAME CMD...: run and time it
    local name="$1" t0=$SECONDS
    shift
    "$@"
    TIMINGS+=("$(printf '%-16s %4ss' "$name" "$((SECONDS - t0))")")
}
show_timings() {
    local line
    log "timings:"
    for line in "${TIMINGS[@]}"; do log "  $line"; done
}

python_base_and_action() { # the base when missing, the runtime through the layer cache
    "$REPO_DIR/deploy/images.sh" build
}

java_base() {
    debootstrap_base "$JAVA_BASE" "$IMAGES_CACHE/java-base-$SUITE-v1.tar" "$SUITE" \
        "openjdk-17-jre-headless" "java -version"
}

node_base() {
    debootstrap_base "$NODE_BASE" "$IMAGES_CACHE/node-base-$SUITE-v1.tar" "$SUITE" "nodejs" \
        "node --version"
}

prometheus_base() {
    debootstrap_base "$PROM_BASE" "$IMAGES_CACHE/prometheus-base-$SUITE-v1.tar" "$SUITE" \
        "prometheus" "prometheus --version"
}

# ------------------------------------------------------------------ docker build helpers
# build IMAGE_TAGS... -- CONTEXT_DIR [DOCKERFILE]: legacy `docker build`, log in STATE_DIR
build_dir() {
    local tags=() ctx dockerfile logf t0=$SECONDS
    while [[ "$1" != "--" ]]; do tags+=(-t "$1"); shift; done
    shift
    ctx="$1" dockerfile="${2:-$1/Dockerfile}"
    mkdir -p "$STATE_DIR"
    logf="$STATE_DIR/build-$(basename "${tags[1]%%:*}").log"
    log "docker build ${tags[*]} (log: $logf)"
    if ! DOCKER_BUILDKIT=0 timeout 1200 docker build "${tags[@]}" -f "$dockerfile" "$ctx" \
        >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2 || true
        die "docker build of ${tags[1]} failed"
    fi
    log "${tags[1]} built in $((SECONDS - t0))s"
}

# ------------------------------------------------------------------ kafka
# stage_dir SRC DEST: DEST becomes a copy of SRC (hard links when possible: same file system)
stage_dir() {
    rm -rf "$2"
    mkdir -p "$(dirname "$2")"
    cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}

# deploy/kafka.sh owns the version and the cache layout: ask it
kafka_version() { "$REPO_DIR/deploy/kafka.sh" version; }

kafka_image() {
    local libs version ctx="$CACHE_ROOT/compose-context/kafka"
    libs="$("$REPO_DIR/deploy/kafka.sh" fetch)" || die "deploy/kafka.sh fetch failed"
    [[ -d "$libs" ]] || die "deploy/kafka.sh fetch printed '$libs', not a directory"
    version="$(kafka_version)" || die "deploy/kafka.sh version failed"
    mkdir -p "$ctx"
    cp "$COMPOSE_DIR"/kafka/{Dockerfile,kafka-entrypoint.sh,kafka-healthcheck.sh,log4j2.properties} "$ctx/"
    stage_dir "$libs" "$ctx/libs"
    rm -f "$ctx/libs/.complete"
    build_dir "$KAFKA_IMAGE:$version" "$KAFKA_IMAGE:latest" -- "$ctx"
}

# ------------------------------------------------------------------ couchdb (pouchdb-server)
couchdb_image() {
    local dir ctx="$CACHE_ROOT/compose-context/couchdb"
    dir="$("$REPO_DIR/deploy/pouchdb.sh" install)" || die "deploy/pouchdb.sh install failed"
    [[ -d "$dir/node_modules" ]] || die "deploy/pouchdb.sh install printed '$dir', which has no node_modules"
    mkdir -p "$ctx"
    cp "$COMPOSE_DIR"/couchdb/{Dockerfile,couchdb-entrypoint.sh,healthcheck.js} "$ctx/"
    stage_dir "$dir/node_modules" "$ctx/node_modules"
    # the sqlite3 addon was never built (--ignore-scripts) and is not used: leave it out
    rm -rf "$ctx/node_modules/sqlite3"
    build_dir "$COUCH_IMAGE" -- "$ctx"
}

# ------------------------------------------------------------------ prometheus
prometheus_image() {
    build_dir "$PROM_IMAGE" -- "$REPO_DIR/deploy/monitoring" \
        "$REPO_DIR/deploy/monitoring/prometheus.Dockerfile"
}

# ------------------------------------------------------------------ invoker
pick_python() {
    local c
    for c in "${INVOKER_PYTHON:-}" "$REPO_DIR/.venv/bin/python" python3; do
        [[ -n "$c" ]] || continue
        if command -v "$c" >/dev/null 2>&1 && "$c" -m pip --version >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# The image's python is Debian bookworm's 3.11 on x86_64 (glibc 2.36): fetch wheels for that,
# whatever python this host runs. Only binary wheels; the project itself is pure Python.
PIP_TARGET=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3
    --abi none --platform manylinux_2_36_x86_64 --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

invoker_wheels() {
    local py src reqs cons
    py="$(pick_python)" || die "no python with pip found (set INVOKER_PYTHON)"
    mkdir -p "$WHEEL_CACHE" "$STATE_DIR"
    # the runtime requirements from pyproject.toml, plus pip itself (it installs the rest
    # in the image: the base has python3 but no pip) and setuptools (builds the project wheel)
    reqs="$STATE_DIR/requirements.txt"
    "$py" - "$REPO_DIR/pyproject.toml" >"$reqs" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    pyproject = tomllib.load(fh)
print("\n".join(pyproject["project"]["dependencies"]))
print("pip")
print("\n".join(pyproject["build-system"]["requires"]))
EOF
    # the versions `make venv` installs and the tests ran with (`make lock` writes them)
    cons="$REPO_DIR/constraints.txt"
    [[ -f "$cons" ]] || die "$cons is missing (make lock writes it)"
    local pipopts=(--disable-pip-version-check -q)
    if "$py" -m pip download "${pipopts[@]}" "${PIP_TARGET[@]}" --no-index --find-links "$WHEEL_CACHE" \
        -c "$cons" -r "$reqs" -d "$WHEEL_CACHE" >"$STATE_DIR/pip-offline.log" 2>&1; then
        log "dependency wheels: all in $WHEEL_CACHE"
    else
        log "downloading dependency wheels into $WHEEL_CACHE (pip download)"
        "$py" -m pip download "${pipopts[@]}" "${PIP_TARGET[@]}" -c "$cons" -r "$reqs" \
            -d "$WHEEL_CACHE" >"$STATE_DIR/pip-download.log" 2>&1 || {
            tail -n 30 "$STATE_DIR/pip-download.log" >&2
            die "pip download of the dependencies failed"
        }
    fi
    rm -rf "$WHEEL_STAGE/deps" "$WHEEL_STAGE/invoker"
    mkdir -p "$WHEEL_STAGE/deps" "$WHEEL_STAGE/invoker"
    # stage exactly the wheels the requirements resolve to (not every version the cache holds)
    "$py" -m pip download "${pipopts[@]}" "${PIP_TARGET[@]}" --no-index --find-links "$WHEEL_CACHE" \
        -c "$cons" -r "$reqs" -d "$WHEEL_STAGE/deps" >"$STATE_DIR/pip-stage.log" 2>&1 || {
        tail -n 30 "$STATE_DIR/pip-stage.log" >&2
        die "staging the dependency wheels failed"
    }
    # setuptools was only needed to build the project wheel
    rm -f "$WHEEL_STAGE"/deps/setuptools-*.whl
    # the project wheel, built from a copy of its sources so that setuptools' build/ and
    # *.egg-info land outside the work tree; SOURCE_DATE_EPOCH makes the wheel byte-identical
    # when the sources are, so an unchanged rebuild hits the layer cache
    src="$(mktemp -d "$STATE_DIR/src.XXXXXX")"
    tar -C "$REPO_DIR" --exclude='__pycache__' --exclude='*.pyc' -cf - pyproject.toml invoker store overflow |
        tar -C "$src" -xf -
    if ! SOURCE_DATE_EPOCH=315532800 "$py" -m pip wheel "${pipopts[@]}" --no-deps --no-index \
        --find-links "$WHEEL_CACHE" -w "$WHEEL_STAGE/invoker" "$src" >"$STATE_DIR/pip-wheel.log" 2>&1; then
        tail -n 30 "$STATE_DIR/pip-wheel.log" >&2
        rm -rf "$src"
        die "building the invoker wheel failed"
    fi
    rm -rf "$src"
    log "staged $(find "$WHEEL_STAGE" -name '*.whl' | wc -l) wheels in $WHEEL_STAGE"
}

invoker_image() {
    invoker_wheels
    local logf="$STATE_DIR/build-invoker.log" t0=$SECONDS
    log "docker build $INVOKER_IMAGE (log: $logf)"
    # The Dockerfile's context is the repo root (as in docker-compose.yml); send only what it
    # reads (a context piped as a tar is not filtered by .dockerignore). Fixed mtimes: the
    # layer cache then depends on the contents only.
    if ! tar -C "$REPO_DIR" --exclude='__pycache__' --exclude='*.pyc' --mtime=@315532800 \
        -cf - deploy/compose/invoker.Dockerfile deploy/compose/invoker-entrypoint.sh \
        deploy/compose/wheels pyproject.toml constraints.txt invoker \
        store overflow |
        DOCKER_BUILDKIT=0 timeout 1200 docker build -t "$INVOKER_IMAGE" \
            --build-arg "PYTHON_BASE=$PY_BASE" -f deploy/compose/invoker.Dockerfile - \
            >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2 || true
        die "docker build of $INVOKER_IMAGE failed"
    fi
    log "$INVOKER_IMAGE built in $((SECONDS - t0))s"
    docker run --rm --network none "$INVOKER_IMAGE" invoker run --print-config >/dev/null ||
        die "$INVOKER_IMAGE cannot run 'invoker run --print-config'"
}

# ------------------------------------------------------------------ commands
cmd_build() {
    docker_answers || die "the Docker engine does not answer; run deploy/docker-engine.sh up first"
    local t0=$SECONDS
    step python-base python_base_and_action
    step java-base java_base
    step node-base node_base
    step prometheus-base prometheus_base
    step invoker invoker_image
    step kafka kafka_image
    step couchdb couchdb_image
    step prometheus prometheus_image
    show_timings
    log "all images ready in $((SECONDS - t0))s"
}

cmd_clean() {
    local img version
    version="$(kafka_version)" || die "deploy/kafka.sh version failed"
    for img in "$INVOKER_IMAGE" "$KAFKA_IMAGE:$version" "$KAFKA_IMAGE:latest" "$COUCH_IMAGE" \
        "$PROM_IMAGE" "$JAVA_BASE" "$NODE_BASE" "$PROM_BASE"; do
        if image_exists "$img"; then
            log "removing $img"
            docker image rm "$img" >/dev/null || log "WARNING: could not remove $img"
        fi
    done
    rm -rf "$WHEEL_STAGE/deps" "$WHEEL_STAGE/invoker"
}

cmd_bases() {
    docker_answers || die "the Docker engine does not answer"
    step python-base python_base_and_action
    step java-base java_base
    step node-base node_base
    step prometheus-base prometheus_base
    show_timings
}

case "${1:-build}" in
    build) cmd_build ;;
    bases) cmd_bases ;;
    clean) cmd_clean ;;
    *)
        echo "usage: $0 [build|bases|clean]" >&2
        exit 2
        ;;
esac
