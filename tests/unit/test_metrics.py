"""invoker.metrics: the lock-free stage histogram exposes what prometheus_client's would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from invoker.metrics import _STAGE_BUCKETS, STAGES, Metrics

# on each bound (le: counted within it), between bounds, below the first and above the last
SECONDS = [0.0, 0.0001, 0.00010001, 0.003, 0.005, 1.0, 29.9, 30.0, 31.0, 1e9]


def test_stage_histogram_matches_prometheus_clients_histogram() -> None:
    metrics = Metrics()
    reference_registry = CollectorRegistry()
    reference = Histogram("invoker_stage_seconds", "the same", ["stage"],
                          buckets=_STAGE_BUCKETS, registry=reference_registry)
    for n, stage in enumerate(STAGES):
        for seconds in SECONDS[n % 3:]:  # a different count per stage
            metrics.stage[stage].observe(seconds)
            reference.labels(stage=stage).observe(seconds)
    ours = {(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in metrics.registry.collect() if family.name == "invoker_stage_seconds"
            for s in family.samples}
    theirs = {(s.name, tuple(sorted(s.labels.items())), s.value)
              for family in reference_registry.collect() for s in family.samples
              if not s.name.endswith("_created")}
    assert ours == theirs
    assert metrics.registry.get_sample_value(
        "invoker_stage_seconds_bucket", {"stage": "run", "le": "0.005"}) == 3  # 1e-4+, 3e-3, 5e-3


def test_activations_by_status_counts_into_the_labelled_counter() -> None:
    metrics = Metrics()
    metrics.activations_by_status["success"].inc()
    metrics.activations_by_status["success"].inc()
    metrics.activations_by_status["developer error"].inc()
    value = metrics.registry.get_sample_value
    assert value("invoker_activations_total", {"status": "success"}) == 2
    assert value("invoker_activations_total", {"status": "developer error"}) == 1
