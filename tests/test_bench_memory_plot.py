"""``make bench``'s memory plot (bench/memory_plot.py, and bench/memory.py's glue): drawn from
synthetic series, no Kafka, store or daemon (the scenario itself is ``python -m bench --only
memory``). The PNG is read back and its pixels checked: the two RSS lines in their colours, the
bound's dashed line, and the y axis broken when the bound is far above the lines."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from bench import memory
from bench.figures import Results
from bench.memory_plot import (
    DPI,
    HEIGHT_IN,
    WIDTH_IN,
    BoundLine,
    RssLine,
    paused_spans,
    write_memory_plot,
)
from tests.support.plots import assert_html_self_contained, assert_png_drawn

SIZE = (int(HEIGHT_IN * DPI), int(WIDTH_IN * DPI))
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1
TIMES = [k * 0.5 for k in range(61)]
FLAT = [50 + 20 * (t > 3) + math.sin(t) for t in TIMES]  # MiB
CLIMB = [50 + min(t, 9) * 23 for t in TIMES]  # to 257 MiB, then the load ran out


def lines() -> list[RssLine]:
    return [RssLine("bounded", TIMES, FLAT, [(3.0, 9.0), (12.0, 20.0)]),
            RssLine("unbounded", TIMES, CLIMB, [(5.0, 6.0)])]


def pixels(path: Path):
    from matplotlib import image

    return (image.imread(path)[..., :3] * 255).round().astype(int)


def rows_of(rgb, colour: tuple[int, int, int]) -> list[int]:
    """The pixel rows holding a pixel within a small distance of ``colour``."""
    near = (abs(rgb - colour).sum(axis=2) < 40).any(axis=1)
    return [int(i) for i in near.nonzero()[0]]


def dashed_rows(rgb) -> list[int]:
    """Rows crossed by a long dashed dark line: many separate dark runs spread over more than
    half the width (a spine is one run; a text line or a legend sample is short)."""
    dark = rgb.max(axis=2) < 80
    found = []
    for i, row in enumerate(dark):
        columns = row.nonzero()[0]
        runs = int(row[0]) + int((row[1:] & ~row[:-1]).sum())
        if runs >= 40 and columns[-1] - columns[0] > rgb.shape[1] / 2:
            found.append(i)
    return found


def test_the_bound_far_above_breaks_the_axis_and_keeps_the_lines_tall(tmp_path: Path) -> None:
    bound = BoundLine(51 + 1419, "bounded's stated bound")
    png, page = write_memory_plot(tmp_path / "memory", lines(), bound,
                                  [("memory.bounded.peak_rss", "73 MiB <b>")], "RSS <x>")
    assert (png.name, page.name) == ("memory.png", "memory.html")
    assert_png_drawn(png, SIZE)
    text = assert_html_self_contained(page, png)
    assert "73 MiB &lt;b&gt;" in text and "<title>RSS &lt;x&gt;</title>" in text
    rgb = pixels(png)
    blue, orange = rows_of(rgb, BLUE), rows_of(rgb, ORANGE)
    assert len(blue) > 10 and len(orange) > 10
    # the climbing line (its peak's label in its colour just above it) reaches the upper part
    # of the image: the 1470 MiB bound did not flatten it (on one linear axis: row ~320 of 500)
    assert min(orange) < 0.4 * SIZE[0], min(orange)
    dashes = dashed_rows(rgb)
    assert dashes, "no bound line"
    assert max(dashes) < min(orange), "the bound is drawn above the lines"


def test_a_bound_near_the_lines_shares_their_axis(tmp_path: Path) -> None:
    png, _ = write_memory_plot(tmp_path / "near", lines(), BoundLine(300, "bound"), [], "t")
    assert_png_drawn(png, SIZE)
    rgb = pixels(png)
    orange, dashes = rows_of(rgb, ORANGE), dashed_rows(rgb)
    assert dashes and max(dashes) < min(orange)
    # one linear axis from 0 to above 300: the bound sits just over the climbing line's top
    # (a band of its own would put it ~70 rows above)
    assert min(orange) - max(dashes) < 0.1 * SIZE[0], (max(dashes), min(orange))


def test_without_a_bound_no_dashed_line(tmp_path: Path) -> None:
    png, _ = write_memory_plot(tmp_path / "none", lines(), None, [], "t")
    assert_png_drawn(png, SIZE)
    assert dashed_rows(pixels(png)) == []


@pytest.mark.parametrize(("samples", "spans"), [
    ([], []),
    ([(0, 0, 0), (1, 0, 0), (2, 0, 0)], []),
    # paused at 1 and 2, resumed by 3: one span; a pause begun and ended between 4 and 5
    ([(0, 0, 0), (1, 1, 1), (2, 1, 1), (3, 0, 1), (4, 0, 1), (5, 0, 2)], [(0, 3), (4, 5)]),
])
def test_paused_spans(samples, spans) -> None:
    assert paused_spans(samples) == spans


def run_of(rss_mib: list[float], paused: list[float]) -> memory.Run:
    samples = [{"t": t, "rss": v * memory.MiB, "paused": p, "pauses": p,
                "worst_case_bytes": 1419 * memory.MiB}
               for t, v, p in zip(TIMES, rss_mib, paused, strict=True)]
    return memory.Run(samples, None, samples[0], samples[-1])


def test_the_scenario_writes_its_plot_and_says_where(tmp_path: Path) -> None:
    out = io.StringIO()
    results = Results(out=out)
    results.add("memory.bounded.peak_rss", 73.2, "MiB", "RSS at t=0 51.2 MiB")
    runs = {"bounded": run_of(FLAT, [float(3 < t < 9) for t in TIMES]),
            "unbounded": run_of(CLIMB, [0.0] * len(TIMES))}
    memory.write_plot(results, memory.MemoryParams(), runs, tmp_path / "memory")
    png, page = tmp_path / "memory.png", tmp_path / "memory.html"
    assert results.errors == []
    assert f"memory: plot written to {png} (and {page}, offline)" in out.getvalue()
    assert_png_drawn(png, SIZE)
    text = assert_html_self_contained(page, png)
    assert "memory.bounded.peak_rss" in text and "RSS at t=0 51.2 MiB" in text
    rgb = pixels(png)
    assert rows_of(rgb, BLUE) and rows_of(rgb, ORANGE) and dashed_rows(rgb)


def test_a_plot_that_cannot_be_written_is_an_error_not_a_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file where the directory should be")
    results = Results(out=io.StringIO())
    runs = {"bounded": run_of(FLAT, [0.0] * len(TIMES)),
            "unbounded": run_of(CLIMB, [0.0] * len(TIMES))}
    memory.write_plot(results, memory.MemoryParams(), runs, blocker / "memory")
    assert len(results.errors) == 1 and "memory: plot not written" in results.errors[0]
