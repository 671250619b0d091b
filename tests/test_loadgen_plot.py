"""``invoker loadgen --plot``: drawing, the page, and failing at the start without matplotlib
(no Kafka, store or daemon: the run itself is drawn in tests/integration/test_loadgen_plot.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from invoker.cli import main as cli_main
from invoker.loadgen import LoadgenError, LoadSpec, run_load
from invoker.loadgen.daemon_metrics import endpoints_of
from invoker.loadgen.plot import check_target, plot_paths, render_html, write_plot
from invoker.loadgen.sampler import DaemonSeries, run_series
from tests.support.plots import assert_html_self_contained, assert_png_drawn


def synthetic_run(daemons: int = 2):
    sends = [i / 100 for i in range(600)]
    done = [(t + 0.05 + 0.3 * (2 < t < 3), 50 + 300 * (2 < t < 3)) for t in sends]
    series = []
    for n in range(daemons):
        (endpoint,) = endpoints_of("http://replica:9180/metrics", [f"10.0.0.{n + 1}"])
        one = DaemonSeries(endpoint, label=f"inv-{n} <b>&")
        for k in range(14):
            t = k * 0.5
            one.add(t, {"rss": (60 + 5 * math.sin(t) + 10 * n) * 2**20,
                        "paused": float(n == 0 and 2 <= t <= 3), "pauses": float(t >= 2),
                        "channel_depth": 40 * abs(math.sin(t)), "readahead_depth": 8.0 * k,
                        "worst_case_bytes": 100 * 2**20, "channel_capacity": 64})
        series.append(one)
    return run_series(0.0, sends, [(t, latency) for t, latency in done]), series


@pytest.mark.parametrize("daemons", [2, 0])
def test_the_plot_is_drawn_and_the_page_holds_it(tmp_path: Path, daemons: int) -> None:
    run, series = synthetic_run(daemons)
    rows = [("namespace", "loadgen-x"), ("daemon 10.0.0.1:9180", "<script>alert(1)</script>")]
    png, page = write_plot(tmp_path / "run", run, series, rows, "invoker loadgen <x>")
    assert (png.name, page.name) == ("run.png", "run.html")
    assert_png_drawn(png)
    text = assert_html_self_contained(page, png)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<title>invoker loadgen &lt;x&gt;</title>" in text
    assert "loadgen-x" in text


def test_the_page_escapes_and_references_nothing() -> None:
    text = render_html(b"\x89PNG", [("a&b", "x\"y<z>")], "t")
    assert "<th>a&amp;b</th><td>x&quot;y&lt;z&gt;</td>" in text
    assert 'src="data:image/png;base64,iVBORw=="' in text


@pytest.mark.parametrize("given", ["out/run", "out/run.png", "out/run.HTML"])
def test_plot_paths(given: str) -> None:
    assert plot_paths(given) == (Path("out/run.png"), Path("out/run.html"))
    assert plot_paths("a.b") == (Path("a.b.png"), Path("a.b.html"))


def test_an_unwritable_target_fails_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(LoadgenError, match="no such directory"):
        check_target(tmp_path / "missing" / "run")
    check_target(tmp_path / "run")


def hide_matplotlib(monkeypatch) -> None:
    """Make ``import matplotlib`` fail as it does where the extra is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_plot_fails_at_the_start(monkeypatch, tmp_path: Path) -> None:
    hide_matplotlib(monkeypatch)
    # nothing listens on port 1: had the run started, the error would be about Kafka or the store
    spec = LoadSpec(bootstrap="127.0.0.1:1", store_url=f"sqlite:///{tmp_path}/s.db",
                    plot=str(tmp_path / "run"))
    with pytest.raises(LoadgenError, match=r"--plot needs matplotlib.*invoker\[plot\]"):
        run_load(spec)
    assert not list(tmp_path.iterdir())  # not even the store was opened


def test_the_cli_says_what_to_install(monkeypatch, tmp_path: Path, capsys) -> None:
    hide_matplotlib(monkeypatch)
    code = cli_main(["loadgen", "--bootstrap", "127.0.0.1:1", "--store-url",
                     f"sqlite:///{tmp_path}/s.db", "--plot", str(tmp_path / "run"),
                     "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install 'invoker[plot]'" in err
