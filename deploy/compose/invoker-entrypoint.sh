#!/bin/sh
# Entrypoint of the invoker image: runs the command as uid/gid 10001 ("invoker").
#
# Started as root (the compose invoker service does, with only the SETUID, SETGID, SETPCAP and
# DAC_READ_SEARCH capabilities), it first looks up the group of the mounted Docker socket,
# whatever its gid on this host, and keeps only that group beside its own, then drops to 10001
# keeping CAP_DAC_READ_SEARCH alone (ambient: it survives the exec; the bounding set holds
# nothing else), to read the action containers' json-file logs, which are root's. (setpriv
# ignores a bounding set it cannot change: without SETPCAP the others would stay in it.)
# Started as anyone else (recorder, loadgen), it runs the command as it is.
set -eu
if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
socket=/var/run/docker.sock
if [ -S "$socket" ]; then
    groups="$(stat -c %g "$socket")"
else
    echo "invoker-entrypoint: no Docker socket at $socket" >&2
    groups=10001
fi
exec setpriv --reuid=10001 --regid=10001 --groups="$groups" \
    --bounding-set=-all,+dac_read_search --inh-caps=-all,+dac_read_search \
    --ambient-caps=-all,+dac_read_search "$@"
