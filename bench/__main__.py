"""``python -m bench [--quick] [--only NAME[,NAME]]`` — see bench/README.md."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import coldstart, e2e, memory, overflow, roundrobin, storebound
from bench.figures import Results, fmt_value
from bench.infra import wait_services
from invoker.cli import configure_logging
from invoker.metrics import STAGES

SERVICES_WAIT_S = 90.0
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"


def scenarios(quick: bool, work: Path) -> dict[str, Callable[[Results], None]]:
    e2e_params = e2e.E2EParams.quick() if quick else e2e.E2EParams()
    cold_params = coldstart.ColdParams.quick() if quick else coldstart.ColdParams()
    rr_params = roundrobin.RoundRobinParams.quick() if quick else roundrobin.RoundRobinParams()
    mem_params = memory.MemoryParams.quick() if quick else memory.MemoryParams()
    ovf_params = overflow.OverflowParams.quick() if quick else overflow.OverflowParams()
    long_params = memory.LongParams.quick() if quick else memory.LongParams()
    sb_params = storebound.StoreBoundParams.quick() if quick else storebound.StoreBoundParams()
    return {
        "e2e-sqlite": lambda r: e2e.run(r, "sqlite", e2e_params, work),
        "e2e-couchdb": lambda r: e2e.run(r, "couchdb", e2e_params, work),
        "roundrobin": lambda r: roundrobin.run(r, rr_params, work),
        "coldstart": lambda r: coldstart.run(r, cold_params),
        "memory": lambda r: memory.run(r, mem_params, work),
        "overflow": lambda r: overflow.run(r, ovf_params, work),
        "storebound": lambda r: storebound.run(r, sb_params, work),
        # on request only (--only memory-long): 11 minutes
        "memory-long": lambda r: memory.run_long(r, long_params, work),
    }


ON_REQUEST = {"memory-long"}  # not in the default set


def summary(results: Results) -> list[str]:
    def v(name: str) -> str:
        f = results.get(name)
        return fmt_value(f.value) if f is not None else "-"

    rows = [
        ("throughput, activations/s", f"sqlite {v('e2e.sqlite.throughput')}   "
                                      f"couchdb {v('e2e.couchdb.throughput')}"),
        ("store bulk insert, records/s", f"sqlite {v('store.sqlite.bulk_insert_rate')}   "
                                         f"couchdb {v('store.couchdb.bulk_insert_rate')}"),
        ("invoker / store", f"sqlite {v('ratio.sqlite.invoker_over_store')}   "
                            f"couchdb {v('ratio.couchdb.invoker_over_store')}"),
        ("daemon CPU per activation, ms", f"sqlite {v('e2e.sqlite.cpu_per_activation')}   "
                                          f"couchdb {v('e2e.couchdb.cpu_per_activation')}"),
        ("machine CPU per activation, ms", f"sqlite {v('e2e.sqlite.machine_cpu_per_activation')}"
                                           f"   couchdb "
                                           f"{v('e2e.couchdb.machine_cpu_per_activation')}"),
        ("  hypervisor steal meanwhile, ms", f"sqlite {v('e2e.sqlite.steal_per_activation')}   "
                                             f"couchdb {v('e2e.couchdb.steal_per_activation')}"),
        ("  ceiling if the daemon cost 0, act/s",
         f"sqlite {v('e2e.sqlite.ceiling_without_daemon_cost')}   "
         f"couchdb {v('e2e.couchdb.ceiling_without_daemon_cost')}"),
        *[(f"  stage {stage} p50, ms", f"sqlite {v(f'e2e.sqlite.stage.{stage}')}   couchdb "
                                        f"{v(f'e2e.couchdb.stage.{stage}')}")
          for stage in STAGES],
        ("round robin, 5x actions, act/s", v("roundrobin.throughput")),
        ("store-bound: invoker / store", f"{v('ratio.storebound.invoker_over_store')}   "
                                         f"({v('storebound.invoker.throughput')} activations/s"
                                         f", store {v('storebound.store.bulk_insert_rate')} "
                                         "records/s, invoker unthrottled "
                                         f"{v('storebound.invoker.unthrottled_throughput')})"),
        ("added latency at half max p50/p99, ms", f"sqlite {v('e2e.sqlite.added_latency_p50')} / "
                                      f"{v('e2e.sqlite.added_latency_p99')}   couchdb "
                                      f"{v('e2e.couchdb.added_latency_p50')} / "
                                      f"{v('e2e.couchdb.added_latency_p99')}"),
        ("  machine busy meanwhile, %", f"sqlite {v('e2e.sqlite.machine_busy')}   "
                                        f"couchdb {v('e2e.couchdb.machine_busy')}"),
        ("  at a quarter of max p50/p99, ms",
         f"sqlite {v('e2e.sqlite.quarter_load_added_latency_p50')} / "
         f"{v('e2e.sqlite.quarter_load_added_latency_p99')}   couchdb "
         f"{v('e2e.couchdb.quarter_load_added_latency_p50')} / "
         f"{v('e2e.couchdb.quarter_load_added_latency_p99')}   (machine busy "
         f"{v('e2e.sqlite.quarter_load_machine_busy')} / "
         f"{v('e2e.couchdb.quarter_load_machine_busy')} %)"),
        ("  Kafka alone at half max p50, ms", f"sqlite {v('e2e.sqlite.kafka_alone_p50')}   "
                                               f"couchdb {v('e2e.couchdb.kafka_alone_p50')}"),
        *[(f"  at half max, stage {stage} p50, ms",
           f"sqlite {v(f'e2e.sqlite.half_load_stage.{stage}')}   couchdb "
           f"{v(f'e2e.couchdb.half_load_stage.{stage}')}")
          for stage in STAGES],
        ("  saturated p50/p99, ms", f"sqlite {v('e2e.sqlite.saturated_added_latency_p50')} / "
                                    f"{v('e2e.sqlite.saturated_added_latency_p99')}   couchdb "
                                    f"{v('e2e.couchdb.saturated_added_latency_p50')} / "
                                    f"{v('e2e.couchdb.saturated_added_latency_p99')}"),
        ("cold / warm start p50, ms", f"{v('coldstart.cold_p50')} / {v('coldstart.warm_p50')}"
                                      f"   ({v('ratio.cold_over_warm')} x)"),
        ("slow store: peak RSS, MiB", f"bounded {v('memory.bounded.peak_rss')}   unbounded "
                                      f"{v('memory.unbounded.peak_rss')}   "
                                      f"({v('ratio.memory.unbounded_over_bounded_peak_rss')} x)"),
        ("slow store: RSS growth, MiB", f"bounded {v('memory.bounded.rss_growth')}   unbounded "
                                        f"{v('memory.unbounded.rss_growth')}   (stated bound "
                                        f"{v('memory.bounded.worst_case_buffered')})"),
        ("slow store: completed", f"bounded {v('memory.bounded.completed_in_window')}   "
                                  f"unbounded {v('memory.unbounded.completed_in_window')}   "
                                  f"(bounded pauses {v('memory.bounded.pauses')})"),
        ("slow store: activations/s", f"overflow off {v('overflow.off.throughput')}   on "
                                      f"{v('overflow.on.throughput')}   "
                                      f"({v('ratio.overflow.on_over_off_throughput')} x)"),
        ("long slow store: RSS, MiB", f"first min {v('memory_long.rss_first_minute')}   last "
                                      f"min {v('memory_long.rss_last_minute')}   peak "
                                      f"{v('memory_long.peak_rss')}"),
        ("  RSS slope, MiB/min", f"{v('memory_long.rss_slope')}   second half "
                                 f"{v('memory_long.rss_slope_second_half')}"),
        ("overflow drain, records/s", f"1 recorder {v('overflow.drain.1_recorder')}   2 "
                                      f"recorders {v('overflow.drain.2_recorders')}   "
                                      f"({v('ratio.overflow.2_over_1_recorders')} x)"),
        ("  recorder / store", f"{v('ratio.overflow.recorder_over_store')}   (store "
                               f"{v('store.overflow.bulk_insert_rate')} records/s)"),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="run only these scenarios: e2e-sqlite, e2e-couchdb, coldstart, "
                             "memory, overflow, storebound; on request only: memory-long")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH,
                        help=f"JSON results file (default {RESULTS_PATH})")
    parser.add_argument("--attempts", type=int, default=2, metavar="N",
                        help="run a scenario that failed again, up to N attempts in all "
                             "(default 2: services on a shared machine may be restarted)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the daemons' logs (their directory is printed)")
    args = parser.parse_args(argv)

    if args.attempts < 1:
        parser.error("--attempts must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="invoker-bench-"))
    available = scenarios(args.quick, work)
    chosen = [name for name in available if name not in ON_REQUEST]
    if args.only:
        chosen = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in available]
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: "
                         f"{', '.join(available)}")

    # In-process components (the container pool) log through structlog: warnings only,
    # on stderr, so stdout carries just the figures.
    configure_logging("warning")
    # kafka-python logs socket errors of clients being closed (loadgen's, the admin's) with
    # tracebacks; failures that matter end up in the load reports instead.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    results = Results()
    results.meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "scenarios": chosen, "host": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    began = time.monotonic()
    print(f"invoker bench ({'quick' if args.quick else 'full'}): {', '.join(chosen)}; "
          f"logs in {work}", flush=True)
    failed = False
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        for attempt in range(1, args.attempts + 1):
            kept = len(results.figures)
            try:
                wait_services(SERVICES_WAIT_S)
                available[name](results)
                break
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                results.error(name, f"attempt {attempt} failed: {_one_line(exc)}")
                del results.figures[kept:]  # a retry reports its own figures
                if attempt == args.attempts:
                    failed = True
                else:
                    print(f"== {name} (attempt {attempt + 1})", flush=True)
        results.meta.setdefault("scenario_seconds", {})[name] = round(time.monotonic() - t0, 1)
    results.meta["seconds"] = round(time.monotonic() - began, 1)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    results.write_json(args.output)
    print("== summary", flush=True)
    for line in summary(results):
        print(line)
    print(f"errors: {len(results.errors)}" + "".join(f"\n  {e}" for e in results.errors))
    print(f"runtime {results.meta['seconds']:.0f} s; figures written to {args.output}")
    if args.keep_logs or failed or results.errors:
        print(f"daemon logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _one_line(exc: BaseException) -> str:
    """The exception on one line: a daemon's log tail in it is in its log file anyway."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += f" ... {lines[-1]}"
    return f"{type(exc).__name__}: {text[:300]}"


if __name__ == "__main__":
    sys.exit(main())
