"""The ``invoker loadgen`` command line: its parser, flags → :class:`LoadSpec`, the handler."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from invoker.config import ENV_PREFIX, Config
from invoker.loadgen.actions import ACTIONS, MAX_COPIES, action_spec_help
from invoker.loadgen.run import run_load
from invoker.loadgen.spec import LoadSpec


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    defaults = Config.__dataclass_fields__
    parser = commands.add_parser(
        "loadgen", help="produce activations and check that every one was stored",
        description="Produce activations to the feed topic at a rate or as fast as possible, "
                    "wait for their completions, check the store and print a report. Exits 0 "
                    "when nothing was lost or duplicated, 1 otherwise, 2 on usage errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="action specs (round-robin; repeat one to weight it):\n" + "\n".join(
            f"  {name:<14}{t.description}"
            + (f" (default {t.default_arg})" if t.default_arg is not None else "")
            for name, t in zip(action_spec_help(), ACTIONS.values(), strict=True)))
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap servers (env INVOKER_KAFKA_BOOTSTRAP, default "
                             f"{defaults['kafka_bootstrap'].default})")
    parser.add_argument("--feed-topic", metavar="TOPIC",
                        help="env INVOKER_FEED_TOPIC, default "
                             f"{defaults['feed_topic'].default}")
    parser.add_argument("--completions-topic", metavar="TOPIC",
                        help="env INVOKER_COMPLETIONS_TOPIC, default "
                             f"{defaults['completions_topic'].default}")
    parser.add_argument("--store-url", metavar="URL",
                        help="the daemon's store (env INVOKER_STORE_URL, default "
                             f"{defaults['store_url'].default})")
    parser.add_argument("--action", dest="actions", action="append", metavar="SPEC",
                        help="action spec, repeatable (default: echo)")
    parser.add_argument("--copies", type=int, default=1, metavar="N",
                        help="deploy every action spec as N distinct actions (names "
                             "<name>-1 ... <name>-N, same code) and spread the activations "
                             f"round-robin over all of them (default 1, at most {MAX_COPIES})")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--count", type=int, metavar="N", help="activations to produce "
                        "(default 100)")
    amount.add_argument("--duration", type=float, metavar="SECONDS",
                        help="produce for this long instead of a count")
    parser.add_argument("--rate", type=float, metavar="PER_SECOND",
                        help="activations per second (default: as fast as possible)")
    parser.add_argument("--namespace", help="namespace of the activations (default: "
                        "loadgen-<random hex>, unique per run)")
    parser.add_argument("--metrics-url", dest="metrics_urls", action="append", default=[],
                        metavar="URL", help="a daemon's /metrics URL, repeatable; a host name "
                        "resolving to several addresses (a compose service with replicas) "
                        "stands for one daemon per address, resolved at the start and the end")
    parser.add_argument("--plot", metavar="FILE",
                        help="write FILE.png and a self-contained FILE.html with the run over "
                             "time, the daemons sampled every 0.5 s (needs matplotlib: pip "
                             "install 'invoker[plot]')")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for completions after producing (default 120)")
    parser.add_argument("--blocking", action="store_true",
                        help="mark activations blocking (completions then carry results)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--no-progress", action="store_true",
                       help="no progress bar (by default it is drawn when stderr is a terminal)")
    shown.add_argument("--progress", action="store_true",
                       help="draw the progress bar even when stderr is not a terminal")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_handle)
    return parser


def spec_from_args(args: argparse.Namespace,
                   environ: Mapping[str, str] | None = None) -> LoadSpec:
    """Flags > INVOKER_* environment > defaults. Raises ValueError on bad values."""
    env = os.environ if environ is None else environ
    defaults = Config.__dataclass_fields__

    def pick(flag: str | None, field_name: str) -> str:
        """The flag, else INVOKER_<FIELD_NAME>, else the Config default."""
        if flag:
            return flag
        default = defaults[field_name].default
        if not isinstance(default, str):
            raise TypeError(f"Config.{field_name} has no string default")
        return env.get(ENV_PREFIX + field_name.upper()) or default

    spec = LoadSpec(
        bootstrap=pick(args.bootstrap, "kafka_bootstrap"),
        feed_topic=pick(args.feed_topic, "feed_topic"),
        completions_topic=pick(args.completions_topic, "completions_topic"),
        store_url=pick(args.store_url, "store_url"),
        actions=list(args.actions or ["echo"]),
        count=args.count if args.count is not None else 100,
        duration_s=args.duration,
        rate=args.rate,
        metrics_urls=list(args.metrics_urls or []),
        completion_timeout_s=args.timeout,
        progress=not args.no_progress,
        force_progress=bool(args.progress),
        blocking=bool(args.blocking),
        copies=args.copies,
        plot=args.plot,
    )
    if args.namespace:
        spec.namespace = args.namespace
    spec.validate()
    return spec


def _handle(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)  # ValueError: the CLI exits 2
    try:
        report = run_load(spec)  # the spec was validated above: any error now is the run's
    except KeyboardInterrupt:
        print("invoker loadgen: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"invoker loadgen: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        sys.stdout.write(report.format() + "\n")
    return 0 if report.ok else 1
