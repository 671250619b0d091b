"""``invoker loadgen`` against two real daemons in one group: each daemon reported, and the run
plotted (``--plot``), through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from invoker.cli import main as cli_main
from tests.support.daemon import KAFKA, wait_for
from tests.support.plots import assert_html_self_contained, assert_png_drawn


def test_two_daemons_reported_each_and_the_run_plotted(daemons, topics, couchdb_url,
                                                       tmp_path: Path, capsys) -> None:
    first, second = daemons(couchdb_url), daemons(couchdb_url)

    def both_own_partitions() -> bool:
        owned = [httpx.get(d.url("/healthz"), timeout=5).json()["partitions"]
                 for d in (first, second)]
        return all(owned) and sum(len(p) for p in owned) == 4

    wait_for(both_own_partitions, 90, "both daemons owning feed partitions", interval_s=0.5)
    target = tmp_path / "run"
    code = cli_main([
        "loadgen", "--bootstrap", KAFKA, "--feed-topic", topics.feed,
        "--completions-topic", topics.completions, "--store-url", couchdb_url,
        "--action", "noop", "--action", "sleep:20", "--rate", "50", "--duration", "4",
        "--metrics-url", first.url("/metrics"), "--metrics-url", second.url("/metrics"),
        "--plot", str(target), "--timeout", "90", "--no-progress", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["ok"], report
    # every daemon answered and was sampled during the run (a series without samples, or
    # missed samples, would be errors)
    assert report["errors"] == []
    assert report["lost"] == 0 and report["duplicate_records"] == 0
    assert report["completed"] == report["produced"] >= 150
    daemons_read = {d["id"]: d for d in report["daemons"]}
    assert set(daemons_read) == {first.invoker_id, second.invoker_id}
    assert report["metrics_read"] == 2
    for daemon in daemons_read.values():
        assert daemon["answered"] and daemon["role"] == "invoker"
        assert daemon["activations_in_run"] > 0  # both own partitions: both ran some
        assert daemon["peak_rss_bytes"] > 0
    assert sum(d["activations_in_run"] for d in daemons_read.values()) == report["completed"]

    png, page = target.with_suffix(".png"), target.with_suffix(".html")
    assert report["plot_files"] == [str(png), str(page)]
    assert_png_drawn(png)
    text = assert_html_self_contained(page, png)
    assert first.invoker_id in text and second.invoker_id in text
