"""The memory scenario's headline plot: each daemon's RSS over the window on one chart, with the
bounded daemon's stated bound as a horizontal line.

The bound is drawn where the loadgen plot draws it: RSS before the load plus
``invoker_worst_case_buffered_bytes``. That figure bounds the bytes of buffered records, not
RSS, and with the default 1 MiB limits it is far above what 32 KB records need; so when the
line sits well above the RSS lines the y axis is broken in two (the same MiB per inch in both
parts): the lines keep most of the height and the bound keeps its own band above them.

Each daemon's feed pauses are shaded in its colour. Drawn with matplotlib's Agg renderer on a
Figure of its own (no pyplot state, no display); matplotlib is imported only when drawing. The
page is loadgen's: the PNG inline and a table of figures, loading nothing else.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invoker.loadgen.plot import plot_paths, render_html
from invoker.loadgen.sampler import paused_spans as paused_spans  # the shading of its charts

WIDTH_IN, HEIGHT_IN, DPI = 10.0, 5.0, 100  # the PNG: 1000 x 500 pixels
# Break the y axis when the bound is this many times above the lines' own range
BREAK_ABOVE = 2.0
BAND_SHARE = 0.2  # the bound's band, as a share of the lower part's height
PAUSED_ALPHA = 0.12


@dataclass(frozen=True)
class RssLine:
    """One daemon over the window: ``times`` in seconds since the load started, ``rss_mib``
    its RSS at those times (NaN: not read), ``paused`` the (from, to) spans its feed was
    paused. The caller bounds the number of samples (the scenario: window / interval)."""

    label: str
    times: Sequence[float]
    rss_mib: Sequence[float]
    paused: Sequence[tuple[float, float]] = ()


@dataclass(frozen=True)
class BoundLine:
    """The horizontal line: ``mib`` on the RSS axis, ``label`` what it is."""

    mib: float
    label: str


def write_memory_plot(target: str | os.PathLike[str], lines: Sequence[RssLine],
                      bound: BoundLine | None, rows: Sequence[tuple[str, str]],
                      title: str) -> tuple[Path, Path]:
    """Draw the chart and write FILE.png and the self-contained FILE.html (``rows``: the
    figures under the image); returns their paths. Blocks: drawing (about a second of CPU)
    and writing the files."""
    png_path, html_path = plot_paths(target)
    png = render_memory_png(lines, bound, title)
    png_path.write_bytes(png)
    html_path.write_text(render_html(png, rows, title), encoding="utf-8")
    return png_path, html_path


def render_memory_png(lines: Sequence[RssLine], bound: BoundLine | None, title: str) -> bytes:
    """The chart as PNG bytes (WIDTH_IN x HEIGHT_IN at DPI). Blocks: about a second of CPU."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    figure.suptitle(title)
    top = max([0.0, *(v for line in lines for v in line.rss_mib if not math.isnan(v))])
    lower_top = (top or 1.0) * 1.15  # room above the highest point for its label
    colours = [f"C{i % 10}" for i in range(len(lines))]
    if bound is not None and bound.mib > BREAK_ABOVE * lower_top:
        band, lower = figure.subplots(2, 1, sharex=True,
                                      height_ratios=[BAND_SHARE, 1 - BAND_SHARE])
        # half the band's range, at the lower part's MiB per inch
        half = lower_top * BAND_SHARE / (1 - BAND_SHARE) / 2
        band.set_ylim(bound.mib - half, bound.mib + half)
        _mark_break(band, lower)
        lower.set_ylim(0, lower_top)
        parts = [band, lower]
    else:
        lower = figure.subplots()
        lower.set_ylim(0, max(lower_top, bound.mib * 1.1 if bound is not None else 0.0))
        parts = [lower]
    for axes in parts:
        for line, colour in zip(lines, colours, strict=True):
            axes.plot(line.times, line.rss_mib, color=colour, linewidth=2)
            for start, end in line.paused:
                axes.axvspan(start, end, color=colour, alpha=PAUSED_ALPHA, linewidth=0)
        if bound is not None:
            axes.axhline(bound.mib, color="black", linestyle="--", linewidth=1)
        axes.grid(True, alpha=0.3)
    for line, colour in zip(lines, colours, strict=True):
        _label_peak(lower, line, colour)
    lower.set_ylabel("RSS (MiB)")
    lower.set_xlabel("seconds since the load started")
    _legend(figure, lines, colours, bound)
    out = io.BytesIO()
    # no Software text chunk: the page then holds no URL (it names matplotlib's site)
    figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _mark_break(band: Any, lower: Any) -> None:
    """The usual broken-axis marks: no spines between the parts, a slash on each side."""
    band.spines.bottom.set_visible(False)
    lower.spines.top.set_visible(False)
    band.tick_params(bottom=False)
    marks = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 10, "linestyle": "none",
             "color": "black", "mec": "black", "mew": 1, "clip_on": False}
    band.plot([0, 1], [0, 0], transform=band.transAxes, **marks)
    lower.plot([0, 1], [1, 1], transform=lower.transAxes, **marks)


def _label_peak(axes: Any, line: RssLine, colour: str) -> None:
    """The line's highest RSS, written above it."""
    points = [(v, t) for t, v in zip(line.times, line.rss_mib, strict=True) if not math.isnan(v)]
    if not points:
        return
    peak, at = max(points)
    axes.annotate(f"peak {peak:.0f} MiB", (at, peak), xytext=(0, 6),
                  textcoords="offset points", ha="right", va="bottom", color=colour)


def _legend(figure: Any, lines: Sequence[RssLine], colours: list[str],
            bound: BoundLine | None) -> None:
    """Under the chart, where no line can run through it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Line2D([], [], color=colour, linewidth=2, label=line.label)
                          for line, colour in zip(lines, colours, strict=True)]
    if bound is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1,
                              label=bound.label))
    handles.append(Patch(color="grey", alpha=2 * PAUSED_ALPHA,
                         label="feed paused (shaded in the daemon's colour)"))
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
