"""Figure 4: cold and warm start times with the container pool directly.

A pool with its own invoker id. Each cold start uses a fresh action name, so it is a real
container create + start + /init + /run; the warm invocations reuse the last cold action's
container (/run only). Times are lease + invoke, wall clock, as an activation sees them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import trio

from bench.figures import Results
from bench.infra import remove_containers
from invoker.containers.pool import ContainerPool, PoolConfig
from invoker.loadgen import percentile
from invoker.metrics import Metrics
from invoker.model import Action, Activation, Limits

NOOP = "def main(params):\n    return {}\n"


@dataclass(frozen=True)
class ColdParams:
    cold: int = 5
    warm: int = 20
    timeout_s: float = 120.0

    @classmethod
    def quick(cls) -> ColdParams:
        return cls(cold=3, warm=10, timeout_s=60.0)


def _action(name: str) -> Action:
    return Action(name=name, version="0.0.1", kind="python:3",
                  image="invoker-action-python:latest", code=NOOP, main="main", binary=False,
                  limits=Limits(timeout_ms=10_000, memory_mb=128, logs_kb=10, concurrency=1))


def _activation(action: Action) -> Activation:
    return Activation(activation_id=uuid.uuid4().hex, namespace="bench", action=action,
                      params={}, blocking=True, transid=uuid.uuid4().hex, submitted_at_ms=None)


async def _measure(invoker_id: str, params: ColdParams) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cold": [], "warm": [], "other": []}
    config = PoolConfig(invoker_id=invoker_id, user_memory_mb=2048)
    with trio.fail_after(params.timeout_s):
        async with ContainerPool.open(config, Metrics()) as pool:
            action = None
            for i in range(params.cold):
                action = _action(f"bench-cold-{invoker_id}-{i}")
                await _invoke(pool, action, times)
            assert action is not None
            for _ in range(params.warm):
                await _invoke(pool, action, times)
    return times


async def _invoke(pool: ContainerPool, action: Action, times: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    activation = _activation(action)
    async with pool.lease(action, activation.namespace) as lease:
        result = await lease.invoke(activation)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    if result.status != 0:
        raise RuntimeError(f"invocation failed: {result.status.label}: {result.result}")
    times.get(result.start_kind, times["other"]).append(elapsed_ms)


def run(results: Results, params: ColdParams) -> None:
    invoker_id = f"benchcold{uuid.uuid4().hex[:8]}"
    try:
        times = trio.run(_measure, invoker_id, params)
    finally:
        left = remove_containers(invoker_id)
    if left:
        results.error("coldstart", f"the pool left {left} containers behind (removed)")
    if times["other"] or len(times["cold"]) != params.cold:
        results.error("coldstart", f"unexpected start kinds: {len(times['cold'])} cold, "
                      f"{len(times['warm'])} warm, {len(times['other'])} other")
    cold, warm = times["cold"], times["warm"]
    results.series["coldstart_ms"] = {"cold": cold, "warm": warm}
    results.add("coldstart.cold_p50", percentile(cold, 50), "ms",
                f"{len(cold)} cold starts, min {min(cold, default=0):.0f} max "
                f"{max(cold, default=0):.0f} ms")
    results.add("coldstart.warm_p50", percentile(warm, 50), "ms",
                f"{len(warm)} warm starts, max {max(warm, default=0):.1f} ms")
    results.ratio("ratio.cold_over_warm", "coldstart.cold_p50", "coldstart.warm_p50")
