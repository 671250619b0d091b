#!/usr/bin/env bash
# Build every image the compose stack needs, with no container registry.
#
#   deploy/compose/images.sh [build]   build what is missing / changed (see below)
#   deploy/compose/images.sh bases     only the base images (python/action, java, node)
#   deploy/compose/images.sh clean     remove the images built here (the caches stay)
#
# What it builds (the bases only when missing; the rest every time, the layer cache makes an
# unchanged rebuild take seconds):
#   invoker-python-base:bookworm,     by deploy/images.sh (debootstrap, python3), only if missing
#   invoker-action-python:latest      (the action runtime the invoker starts)
#   invoker-java-base:bookworm        debootstrap minbase + openjdk-17-jre-headless, docker import
#   invoker-node-base:bookworm        debootstrap minbase + nodejs (Debian's node 18)
#   invoker-local/invoker:latest      deploy/compose/invoker.Dockerfile; the project and its
#                                     dependencies as wheels built on this host (pip inside
#                                     `docker build` cannot reach PyPI), installed --no-index
#   invoker-local/kafka:latest        deploy/compose/kafka/: the Kafka broker jars of
#                                     deploy/kafka/pom.xml (the cache deploy/kafka.sh fills)
#   invoker-local/couchdb:latest      deploy/compose/couchdb/: pouchdb-server (the CouchDB API)
#                                     from the npm install deploy/pouchdb.sh caches
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
ACTION_IMAGE="invoker-action-python:latest"
JAVA_BASE="invoker-java-base:$SUITE"
NODE_BASE="invoker-node-base:$SUITE"
INVOKER_IMAGE="invoker-local/invoker:latest"
KAFKA_IMAGE="invoker-local/kafka"
COUCH_IMAGE="invoker-local/couchdb:latest"

POM="$REPO_DIR/deploy/kafka/pom.xml"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
KAFKA_LIBS="$CACHE_ROOT/kafka-$KAFKA_VERSION/libs" # same layout as deploy/kafka.sh
POUCHDB_VERSION=4.2.0                              # same as deploy/pouchdb.sh
POUCHDB_DIR="$CACHE_ROOT/pouchdb-server-$POUCHDB_VERSION"
WHEEL_CACHE="$CACHE_ROOT/compose-wheels/cp311-manylinux-x86_64"
WHEEL_STAGE="$COMPOSE_DIR/.wheels" # inside the repo: the Dockerfile's context is the repo root

log() { echo "[compose-images] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

TIMINGS=()
step() { # step NAME CMD...: run and time it
    local name="$1" t0=$SECONDS
    shift
    "$@"
    TIMINGS+=("$(printf '%-16s %4ss' "$name" "$((SECONDS - t0))")")
}

debian_mirror() { # as deploy/images.sh: $DEBIAN_MIRROR, else the host's apt source for $SUITE
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local m=""
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
    if [[ -z "$m" && -f /etc/apt/sources.list ]]; then
        m="$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list |
            awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }')"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

apt_install() {
    log "installing $* (apt-get)"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
        die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -q \
        --no-install-recommends "$@" >&2 || die "apt-get install $* failed"
}

# ------------------------------------------------------------------ debootstrap'ed bases
ROOTFS_TMP=""
cleanup_rootfs() {
    [[ -n "$ROOTFS_TMP" && -d "$ROOTFS_TMP" ]] || return 0
    local mnt
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET 2>/dev/null | grep -F "$ROOTFS_TMP/" | sort -r)
    rm -rf --one-file-system "$ROOTFS_TMP" || log "WARNING: could not remove $ROOTFS_TMP"
    ROOTFS_TMP=""
}
trap cleanup_rootfs EXIT

# debootstrap_base IMAGE TARBALL INCLUDE CHECK_CMD: import IMAGE from the cached rootfs TARBALL,
# making the tarball first (debootstrap --variant=minbase --include=INCLUDE) if it is missing.
debootstrap_base() {
    local image="$1" tarball="$2" include="$3" check="$4"
    if image_exists "$image"; then
        log "$image exists; skipping"
        return 0
    fi
    if [[ ! -s "$tarball" ]]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
        mkdir -p "$IMAGES_CACHE" "$STATE_DIR"
        local mirror t0=$SECONDS logf
        mirror="$(debian_mirror)"
        logf="$STATE_DIR/debootstrap-$(basename "$tarball" .tar).log"
        ROOTFS_TMP="$(mktemp -d "$IMAGES_CACHE/rootfs.XXXXXX")"
        log "debootstrap --variant=minbase --include=$include $SUITE from $mirror (log: $logf)"
        if ! timeout 1500 debootstrap --variant=minbase --include="$include" "$SUITE" "$ROOTFS_TMP" \
            "$mirror" >"$logf" 2>&1; then
            tail -n 30 "$logf" >&2 || true
            [[ -f "$ROOTFS_TMP/debootstrap/debootstrap.log" ]] &&
                tail -n 30 "$ROOTFS_TMP/debootstrap/debootstrap.log" >&2
            die "debootstrap for $image failed"
        fi
        # nothing in these images runs apt; docs and man pages are dead weight
        rm -rf "$ROOTFS_TMP"/var/cache/apt/archives/*.deb "$ROOTFS_TMP"/var/lib/apt/lists/* \
            "$ROOTFS_TMP"/var/cache/apt/*.bin "$ROOTFS_TMP"/debootstrap \
            "$ROOTFS_TMP"/usr/share/doc/* "$ROOTFS_TMP"/usr/share/man/* "$ROOTFS_TMP"/usr/share/info/*
        local mnt
        while read -r mnt; do
            umount -l "$mnt" 2>/dev/null || true
        done < <(findmnt -rn -o TARGET 2>/dev/null | grep -F "$ROOTFS_TMP/" | sort -r)
        tar --numeric-owner --one-file-system -C "$ROOTFS_TMP" -cf "$tarball.tmp" . ||
            die "tar of the rootfs failed"
        mv "$tarball.tmp" "$tarball"
        cleanup_rootfs
        log "rootfs for $image built in $((SECONDS - t0))s ($(du -h "$tarball" | cut -f1))"
    fi
    log "importing $tarball as $image"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --message "debootstrap --variant=minbase --include=$include $SUITE" \
        - "$image" <"$tarball" >/dev/null || die "docker import of $image failed"
    docker run --rm --network none "$image" sh -c "$check" >&2 ||
        die "$image was imported but '$check' fails in it"
}

python_base_and_action() {
    if image_exists "$PY_BASE" && image_exists "$ACTION_IMAGE"; then
        log "$PY_BASE and $ACTION_IMAGE exist; skipping deploy/images.sh"
        return 0
    fi
    log "running deploy/images.sh build ($PY_BASE and/or $ACTION_IMAGE missing)"
    "$REPO_DIR/deploy/images.sh" build
}

java_base() {
    debootstrap_base "$JAVA_BASE" "$IMAGES_CACHE/java-base-$SUITE-v1.tar" \
        "openjdk-17-jre-headless" "java -version"
}

node_base() {
    debootstrap_base "$NODE_BASE" "$IMAGES_CACHE/node-base-$SUITE-v1.tar" "nodejs" "node --version"
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
ensure_kafka_jars() {
    [[ -n "$KAFKA_VERSION" ]] || die "no kafka.version in $POM"
    [[ -f "$KAFKA_LIBS/.complete" ]] && return 0
    # what deploy/kafka.sh's ensure_jars does (without starting a broker)
    command -v mvn >/dev/null 2>&1 || apt_install maven
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
    local dir tmp
    dir="$(dirname "$KAFKA_LIBS")"
    tmp="$dir/libs.tmp.$$"
    mkdir -p "$dir"
    rm -rf "$tmp"
    if ! (cd "$dir" && timeout 900 mvn -q -B -Dstyle.color=never -f "$POM" \
        dependency:copy-dependencies -DoutputDirectory="$tmp" >"$dir/mvn.log" 2>&1); then
        tail -n 40 "$dir/mvn.log" >&2 || true
        rm -rf "$tmp"
        die "mvn dependency:copy-dependencies failed (log: $dir/mvn.log)"
    fi
    [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"
    touch "$tmp/.complete"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
}

# stage_dir SRC DEST: DEST becomes a copy of SRC (hard links when possible: same file system)
stage_dir() {
    rm -rf "$2"
    mkdir -p "$(dirname "$2")"
    cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}

kafka_image() {
    ensure_kafka_jars
    local ctx="$CACHE_ROOT/compose-context/kafka"
    mkdir -p "$ctx"
    cp "$COMPOSE_DIR"/kafka/{Dockerfile,kafka-entrypoint.sh,kafka-healthcheck.sh,log4j2.properties} "$ctx/"
    stage_dir "$KAFKA_LIBS" "$ctx/libs"
    rm -f "$ctx/libs/.complete"
    build_dir "$KAFKA_IMAGE:$KAFKA_VERSION" "$KAFKA_IMAGE:latest" -- "$ctx"
}

# ------------------------------------------------------------------ couchdb (pouchdb-server)
ensure_pouchdb_modules() {
    [[ -f "$POUCHDB_DIR/.complete" && -d "$POUCHDB_DIR/node_modules/pouchdb-server" ]] && return 0
    # what deploy/pouchdb.sh's ensure_installed does (without starting a server)
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    log "installing pouchdb-server@$POUCHDB_VERSION from npm into $POUCHDB_DIR"
    local tmp="$POUCHDB_DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    echo '{"name":"invoker-pouchdb-server","private":true}' >"$tmp/package.json"
    # --ignore-scripts: leveldown finds its bundled N-API prebuild at run time; sqlite3's source
    # build is only for --sqlite, which is not used
    if ! (cd "$tmp" && timeout 600 npm install --no-audit --no-fund --loglevel=error --ignore-scripts \
        "pouchdb-server@$POUCHDB_VERSION" >"$tmp/npm.log" 2>&1); then
        tail -n 40 "$tmp/npm.log" >&2 || true
        die "npm install pouchdb-server@$POUCHDB_VERSION failed (log: $tmp/npm.log)"
    fi
    touch "$tmp/.complete"
    rm -rf "$POUCHDB_DIR"
    mv "$tmp" "$POUCHDB_DIR"
}

couchdb_image() {
    ensure_pouchdb_modules
    local ctx="$CACHE_ROOT/compose-context/couchdb"
    mkdir -p "$ctx"
    cp "$COMPOSE_DIR"/couchdb/{Dockerfile,couchdb-entrypoint.sh,healthcheck.js} "$ctx/"
    stage_dir "$POUCHDB_DIR/node_modules" "$ctx/node_modules"
    # the sqlite3 addon was never built (--ignore-scripts) and is not used: leave it out
    rm -rf "$ctx/node_modules/sqlite3"
    build_dir "$COUCH_IMAGE" -- "$ctx"
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
    # pin to what the project's venv has (what the tests ran with), when there is one
    cons="$STATE_DIR/constraints.txt"
    : >"$cons"
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
        "$REPO_DIR/.venv/bin/python" -m pip list --format=freeze --exclude-editable 2>/dev/null |
            grep -v -i -E '^(pip|setuptools)==' >"$cons" || true
    fi
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
    rm -rf "$WHEEL_STAGE"
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
    # The Dockerfile's context is the repo root (as in docker-compose.yml); send only the two
    # things it reads, not the whole work tree (.venv, .git...): there is no .dockerignore.
    if ! tar -C "$REPO_DIR" -cf - deploy/compose/invoker.Dockerfile deploy/compose/.wheels |
        DOCKER_BUILDKIT=0 timeout 1200 docker build -t "$INVOKER_IMAGE" \
            -f deploy/compose/invoker.Dockerfile - >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2 || true
        die "docker build of $INVOKER_IMAGE failed"
    fi
    log "$INVOKER_IMAGE built in $((SECONDS - t0))s"
    docker run --rm --network none "$INVOKER_IMAGE" invoker run --print-config >/dev/null ||
        die "$INVOKER_IMAGE cannot run 'invoker run --print-config'"
}

# ------------------------------------------------------------------ commands
cmd_build() {
    timeout 10 docker info >/dev/null 2>&1 ||
        die "the Docker engine does not answer; run deploy/docker-engine.sh up first"
    local t0=$SECONDS
    step python-base python_base_and_action
    step java-base java_base
    step node-base node_base
    step invoker invoker_image
    step kafka kafka_image
    step couchdb couchdb_image
    log "timings:"
    local line
    for line in "${TIMINGS[@]}"; do log "  $line"; done
    log "all images ready in $((SECONDS - t0))s"
}

cmd_clean() {
    local img
    for img in "$INVOKER_IMAGE" "$KAFKA_IMAGE:$KAFKA_VERSION" "$KAFKA_IMAGE:latest" "$COUCH_IMAGE" \
        "$JAVA_BASE" "$NODE_BASE"; do
        if image_exists "$img"; then
            log "removing $img"
            docker image rm "$img" >/dev/null || log "WARNING: could not remove $img"
        fi
    done
    rm -rf "$WHEEL_STAGE"
}

cmd_bases() {
    timeout 10 docker info >/dev/null 2>&1 || die "the Docker engine does not answer"
    step python-base python_base_and_action
    step java-base java_base
    step node-base node_base
    local line
    for line in "${TIMINGS[@]}"; do log "  $line"; done
}

case "${1:-build}" in
    build) cmd_build ;;
    bases) cmd_bases ;;
    clean) cmd_clean ;;
    *)
        echo "usage: $0 [build|clean]" >&2
        exit 2
        ;;
esac
