# Shared by the deploy/ scripts (sourced; the caller defines log() and die()).
# shellcheck shell=bash

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

# pid_from_file PID_FILE IS_OURS_FN: the pid of our process, from PID_FILE if IS_OURS_FN accepts it,
# else from a /proc scan (pidfile lost or stale), written back to PID_FILE
pid_from_file() {
    local file=$1 is_ours=$2 pid=""
    if [[ -f "$file" ]]; then
        pid="$(cat "$file" 2>/dev/null || true)"
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && "$is_ours" "$pid"; then
            echo "$pid"
            return 0
        fi
    fi
    local p
    for p in /proc/[0-9]*; do
        p="${p#/proc/}"
        if "$is_ours" "$p"; then
            echo "$p" >"$file"
            echo "$p"
            return 0
        fi
    done
    return 1
}

# stop_service NAME GRACE_S PID_FILE PID_FN: stop the process PID_FN prints (stop_process), if any
stop_service() {
    local name=$1 grace=$2 pid_file=$3 pid_fn=$4 pid
    if ! pid="$("$pid_fn")"; then
        rm -f "$pid_file"
        log "not running"
        return 0
    fi
    log "stopping $name (pid $pid)"
    stop_process "$name" "$pid" "$grace"
    rm -f "$pid_file"
    log "stopped"
}

# port_listening PORT: true if something accepts TCP connections on 127.0.0.1:PORT
port_listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# show_log_tail LINES FILE...: the last LINES of each non-empty FILE, on stderr
show_log_tail() {
    local n=$1 f
    shift
    for f in "$@"; do
        if [[ -s "$f" ]]; then
            log "last lines of $f:"
            tail -n "$n" "$f" >&2 || true
        fi
    done
}

docker_answers() { timeout 10 docker info >/dev/null 2>&1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# apt_install [--with-recommends] PACKAGE...: for what a fresh machine lacks (docker.io,
# debootstrap, maven...); waits for the dpkg lock
apt_install() {
    local opts=(--no-install-recommends)
    if [[ "$1" == --with-recommends ]]; then
        opts=()
        shift
    fi
    log "installing $* (apt-get)"
    local t0=$SECONDS
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
        die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -q \
        "${opts[@]}" "$@" >&2 || die "apt-get install $* failed"
    log "installed $* in $((SECONDS - t0))s"
}

# debian_mirror SUITE: $DEBIAN_MIRROR, else the host's apt source for SUITE, else deb.debian.org
debian_mirror() {
    local suite=$1 m=""
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    # deb822 sources: the URIs of the first "deb" stanza whose Suites list the plain suite
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        m="$(awk -v suite="$suite" '
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
            awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }')"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

# Base images made with debootstrap (there is no registry to pull one from).
ROOTFS_TMP=""
_unmount_rootfs() {
    # debootstrap may leave /proc, /sys or device bind mounts behind
    local mnt
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(findmnt -rn -o TARGET 2>/dev/null | grep -F "$ROOTFS_TMP/" | sort -r)
}
cleanup_rootfs() { # the callers trap it on EXIT: a failed debootstrap leaves nothing behind
    [[ -n "$ROOTFS_TMP" && -d "$ROOTFS_TMP" ]] || return 0
    _unmount_rootfs
    rm -rf --one-file-system "$ROOTFS_TMP" || log "WARNING: could not remove $ROOTFS_TMP"
    ROOTFS_TMP=""
}

# debootstrap_base IMAGE TARBALL SUITE INCLUDE CHECK_CMD [DOCKER_IMPORT_CHANGE...]:
# IMAGE, unless it exists, imported from the rootfs TARBALL, which is made first
# (debootstrap --variant=minbase --include=INCLUDE SUITE) unless it is cached. CHECK_CMD runs in
# the new image to prove it works. Logs go to $STATE_DIR.
debootstrap_base() {
    local image=$1 tarball=$2 suite=$3 include=$4 check=$5
    shift 5
    local changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        --change 'ENV LANG=C.UTF-8')
    local change
    for change in "$@"; do changes+=(--change "$change"); done
    if image_exists "$image"; then
        log "$image exists; skipping"
        return 0
    fi
    if [[ ! -s "$tarball" ]]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
        mkdir -p "$(dirname "$tarball")" "$STATE_DIR"
        local mirror t0=$SECONDS logf
        mirror="$(debian_mirror "$suite")"
        logf="$STATE_DIR/debootstrap-$(basename "$tarball" .tar).log"
        ROOTFS_TMP="$(mktemp -d "$(dirname "$tarball")/rootfs.XXXXXX")"
        log "debootstrap --variant=minbase --include=$include $suite from $mirror (log: $logf)"
        if ! timeout 1500 debootstrap --variant=minbase --include="$include" "$suite" \
            "$ROOTFS_TMP" "$mirror" >"$logf" 2>&1; then
            tail -n 30 "$logf" >&2 || true
            [[ -f "$ROOTFS_TMP/debootstrap/debootstrap.log" ]] &&
                tail -n 30 "$ROOTFS_TMP/debootstrap/debootstrap.log" >&2
            die "debootstrap for $image failed"
        fi
        # nothing in these images runs apt; docs and man pages are dead weight
        rm -rf "$ROOTFS_TMP"/var/cache/apt/archives/*.deb "$ROOTFS_TMP"/var/lib/apt/lists/* \
            "$ROOTFS_TMP"/var/cache/apt/*.bin "$ROOTFS_TMP"/debootstrap \
            "$ROOTFS_TMP"/usr/share/doc/* "$ROOTFS_TMP"/usr/share/man/* "$ROOTFS_TMP"/usr/share/info/*
        _unmount_rootfs
        tar --numeric-owner --one-file-system -C "$ROOTFS_TMP" -cf "$tarball.tmp" . ||
            die "tar of the rootfs failed"
        mv "$tarball.tmp" "$tarball"
        cleanup_rootfs
        log "rootfs for $image built in $((SECONDS - t0))s ($(du -h "$tarball" | cut -f1))"
    fi
    log "importing $tarball as $image"
    docker import "${changes[@]}" --message "debootstrap --variant=minbase --include=$include $suite" \
        - "$image" <"$tarball" >/dev/null || die "docker import of $image failed"
    docker run --rm --network none "$image" sh -c "$check" >&2 ||
        die "$image was imported but '$check' fails in it"
}
