"""The ``invoker`` command: ``run`` (the daemon), ``recorder``, ``loadgen`` and ``status``.

Exit status of ``run`` and ``recorder``: 0 after a graceful stop (the first SIGTERM/SIGINT);
130 when a second signal stopped it at once, or SIGINT came before signals were watched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn

import structlog
import trio

from invoker.config import RECORDER, RUN, SOURCES_HELP, add_config_arguments, load_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from invoker.config import Config
    from invoker.service import FeedService

_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for an interrupted command


def configure_logging(level: str) -> None:
    """JSON lines on stderr; ``level`` filters (debug shows one line per activation)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # kafka-python logs through the standard library; keep its noise at warning and above.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format='{"event": "%(message)s", "logger": "%(name)s", '
                               '"level": "%(levelname)s"}')
    # While a broker is unreachable kafka-python logs every reconnect attempt at ERROR; the
    # daemon's own "publish failed" / "commit failed" lines already say so, once per retry.
    # A deleted topic makes kafka.cluster log "not found in cluster metadata" ~8 times a second;
    # /healthz and the "publish failed" lines say it once.
    for noisy in ("kafka.conn", "kafka.client", "kafka.producer.sender", "kafka.cluster"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.print_config:
        json.dump(config.masked(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    configure_logging(config.log_level)
    _limit_malloc_arenas()
    service: Callable[[Config], FeedService]
    if args.command == "recorder":
        from overflow.recorder import Recorder as service
    else:
        from invoker.daemon import Invoker as service

    try:
        trio.run(_run_until_signalled, service(config))
    except KeyboardInterrupt:  # SIGINT before trio watched the signals
        return EXIT_INTERRUPTED
    return 0


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Two glibc malloc arenas instead of one per thread (up to 8 per core), unless the
    environment sets MALLOC_ARENA_MAX. Under a slow store the per-thread arenas of the worker
    threads kept freed memory: RSS rose ~20 MiB over minutes before levelling off; with two it
    is flat after the first minute and 9-16 MiB lower, at no measurable CPU cost
    (bench/README.md, memory-long). Call it before threads start. No-op off glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to tune


async def _run_until_signalled(service: FeedService) -> None:
    """Run ``service`` with SIGTERM/SIGINT watched for its whole life: the first begins a
    graceful stop, the second ends the process at once with status 130."""
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            await service.run()
            nursery.cancel_scope.cancel()  # stopped: signals take their default action again

        nursery.start_soon(serve)
        await service.watch_signals()
        _exit_at_once(EXIT_INTERRUPTED)


def _exit_at_once(status: int) -> NoReturn:
    """End the process without unwinding: threads blocked on Kafka, the store or Docker are
    not waited for. Nothing more is committed (what was not runs again after a restart); action
    containers left are removed by the next start (see invoker.containers.pool) or
    ``compose.sh down``."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoker",
        description="Serverless invoker: runs activations from Kafka in Docker containers and "
                    "stores their records with bounded memory.")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, summary, text in [
        (RUN, "run the invoker daemon",
         "Run the invoker daemon until SIGTERM/SIGINT: activations from the feed topic run in "
         "Docker containers, records go to the store."),
        (RECORDER, "run a recorder: overflow topic -> store",
         "Run a recorder until SIGTERM/SIGINT: records from the overflow topic go to the store, "
         "then their completions are published. Start several with the same recorder_group_id "
         "to share the topic's partitions."),
    ]:
        service = commands.add_parser(name, help=summary, description=text,
                                      epilog=SOURCES_HELP)
        service.add_argument("--print-config", action="store_true",
                             help="print the effective configuration (secrets masked) and exit")
        add_config_arguments(service, name)
        service.set_defaults(handler=_serve)

    from invoker import loadgen, status

    loadgen.add_parser(commands)
    status.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler  # each command's set_defaults
    try:
        return handler(args)
    except ValueError as exc:
        parser.exit(2, f"invoker: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
