"""``invoker loadgen --plot FILE``: the run over time as FILE.png and a self-contained FILE.html.

Four panels sharing the time axis (seconds since the run started):

1. produced and completed per second (the loadgen's own counts);
2. latency produce → completion, p50 and p99 of the completions seen in each bin;
3. each daemon's RSS, and as a dashed reference its RSS at the start plus its
   ``invoker_worst_case_buffered_bytes`` (a bound on the bytes of buffered records, not on RSS:
   the legend says so), with the time its feed was paused shaded in its colour;
4. each daemon's record-channel depth (solid) against the channel's capacity (dashed), and its
   read-ahead depth (dotted), feed pauses shaded again.

Each daemon has a colour (named in the legends beside the panels: its id and address).

The HTML page holds the PNG as a data URI and a table of the report's figures: it loads
nothing (no scripts, styles or images from elsewhere). Everything a daemon sent is
HTML-escaped. matplotlib is an optional extra (``pip install 'invoker[plot]'``); it is drawn
with the Agg renderer on a Figure of its own (no pyplot state), so it needs no display.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoker.loadgen.sampler import DaemonSeries, RunSeries

if TYPE_CHECKING:  # matplotlib is an optional extra: imported where it draws
    from matplotlib.typing import LineStyleType
from invoker.loadgen.spec import LoadgenError

WIDTH_IN, HEIGHT_IN, DPI = 14.0, 12.0, 100  # the PNG: 1400 x 1200 pixels
MAX_LEGEND_DAEMONS = 8  # daemons named in a legend; the rest are drawn unnamed
PAUSED_ALPHA = 0.15
_SUFFIXES = (".png", ".html")


def require_matplotlib() -> None:
    """Raise LoadgenError with what to install when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise LoadgenError(
            "--plot needs matplotlib, an optional extra: pip install 'invoker[plot]' "
            f"(or pip install 'matplotlib>=3.8'); importing it failed: {exc}") from None


def plot_paths(target: str | os.PathLike[str]) -> tuple[Path, Path]:
    """FILE.png and FILE.html for ``target`` (a ``.png`` or ``.html`` suffix is dropped)."""
    base = Path(target)
    if base.suffix.lower() in _SUFFIXES:
        base = base.with_suffix("")
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".html")


def check_target(target: str | os.PathLike[str]) -> None:
    """Raise LoadgenError when the plot files could not be written (checked before a run)."""
    for path in plot_paths(target):
        folder = path.parent
        if not folder.is_dir():
            raise LoadgenError(f"--plot: no such directory {str(folder)!r}")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise LoadgenError(f"--plot: {str(path)!r} is not writable")


def write_plot(target: str | os.PathLike[str], run: RunSeries, daemons: Sequence[DaemonSeries],
               rows: Sequence[tuple[str, str]], title: str) -> tuple[Path, Path]:
    """Draw the run and write FILE.png and FILE.html; returns their paths. Blocks: drawing
    (about a second of CPU) and writing the files."""
    png_path, html_path = plot_paths(target)
    png = render_png(run, daemons, title)
    png_path.write_bytes(png)
    html_path.write_text(render_html(png, rows, title), encoding="utf-8")
    return png_path, html_path


def render_png(run: RunSeries, daemons: Sequence[DaemonSeries], title: str) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    rates, latency, memory, depth = figure.subplots(4, 1, sharex=True)
    figure.suptitle(title)
    _draw_rates(rates, run)
    _draw_latency(latency, run)
    colours = [f"C{i % 10}" for i in range(len(daemons))]
    if any(series.samples for series in daemons):
        _draw_memory(memory, daemons, colours)
        _draw_depths(depth, daemons, colours)
    else:
        why = "no daemon metrics sampled" + ("" if daemons else " (give --metrics-url)")
        for axes in (memory, depth):
            axes.text(0.5, 0.5, why, transform=axes.transAxes, ha="center", va="center")
    depth.set_ylabel("records / messages")
    depth.set_xlabel("seconds since the run started")
    for axes in (rates, latency, memory, depth):
        axes.grid(True, alpha=0.3)
    out = io.BytesIO()
    # no Software text chunk: the page then holds no URL at all (it names matplotlib's site)
    figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _steps(run: RunSeries, values: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """Bin values as a step line: each held over its bin (None: a gap)."""
    xs, ys = [], []
    for start, value in zip(run.starts, values, strict=True):
        y = math.nan if value is None else value
        xs += [start, start + run.bin_s]
        ys += [y, y]
    return xs, ys


def _draw_rates(axes: Any, run: RunSeries) -> None:
    axes.plot(*_steps(run, run.produced_per_s), label="produced")
    axes.plot(*_steps(run, run.completed_per_s), label="completed")
    binned = "" if run.bin_s == 1 else f" (bins of {run.bin_s:g} s)"
    axes.set_ylabel("activations / s" + binned)
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _draw_latency(axes: Any, run: RunSeries) -> None:
    axes.plot(*_steps(run, run.latency_p50_ms), label="p50")
    axes.plot(*_steps(run, run.latency_p99_ms), label="p99")
    seen = [v for v in run.latency_p99_ms if v is not None and v > 0]
    if seen and max(seen) > 20 * min(seen):
        axes.set_yscale("log")
    axes.set_ylabel("latency produce → completion (ms)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _draw_memory(axes: Any, daemons: Sequence[DaemonSeries], colours: list[str]) -> None:
    highest_rss = highest_bound = 0.0
    for series, colour in zip(daemons, colours, strict=True):
        if not series.samples:
            continue
        rss_mib = [s.rss / 2**20 for s in series.samples]
        axes.plot([s.t for s in series.samples], rss_mib, color=colour)
        highest_rss = max([highest_rss, *(v for v in rss_mib if not math.isnan(v))])
        start_rss = series.samples[0].rss
        if series.worst_case_bytes is not None and not math.isnan(start_rss):
            bound_mib = (start_rss + series.worst_case_bytes) / 2**20
            axes.axhline(bound_mib, color=colour, linestyle="--", linewidth=1)
            highest_bound = max(highest_bound, bound_mib)
        _shade_pauses(axes, series, colour)
    if highest_rss > 0 and highest_bound > 10 * highest_rss:
        axes.set_yscale("log")  # a far-off bound would flatten the RSS lines
        axes.set_ylabel("RSS (MiB, log scale)")
    else:
        axes.set_ylim(bottom=0)
        axes.set_ylabel("RSS (MiB)")
    _legend(axes, daemons, colours, [
        ("-", "RSS"),
        ("--", "RSS at start + worst-case buffered bytes\n(a bound on buffered records, "
               "not on RSS)"),
    ])


def _draw_depths(axes: Any, daemons: Sequence[DaemonSeries], colours: list[str]) -> None:
    for series, colour in zip(daemons, colours, strict=True):
        if not series.samples:
            continue
        times = [s.t for s in series.samples]
        axes.plot(times, [s.channel_depth for s in series.samples], color=colour)
        axes.plot(times, [s.readahead_depth for s in series.samples], color=colour,
                  linestyle=":")
        if series.channel_capacity is not None:
            axes.axhline(series.channel_capacity, color=colour, linestyle="--", linewidth=1)
        _shade_pauses(axes, series, colour)
    axes.set_ylim(bottom=0)
    _legend(axes, daemons, colours, [
        ("-", "record-channel depth"), (":", "read-ahead depth"),
        ("--", "record-channel capacity"),
    ])


def _shade_pauses(axes: Any, series: DaemonSeries, colour: str) -> None:
    for start, end in series.paused_spans():
        axes.axvspan(start, end, color=colour, alpha=PAUSED_ALPHA, linewidth=0)


def _legend(axes: Any, daemons: Sequence[DaemonSeries], colours: list[str],
            styles: list[tuple[LineStyleType, str]]) -> None:
    """Beside the panel: a colour per daemon (the first MAX_LEGEND_DAEMONS), then what each
    line style and the shading mean."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Line2D([], [], color=colour, label=series.label)
                          for series, colour in list(zip(daemons, colours,
                                                         strict=True))[:MAX_LEGEND_DAEMONS]]
    if len(daemons) > MAX_LEGEND_DAEMONS:
        handles.append(Line2D([], [], color="none",
                              label=f"... {len(daemons) - MAX_LEGEND_DAEMONS} more daemons"))
    handles += [Line2D([], [], color="black", linestyle=style, label=meaning)
                for style, meaning in styles]
    handles.append(Patch(color="black", alpha=PAUSED_ALPHA, label="feed paused (shaded)"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                fontsize="small")


def render_html(png: bytes, rows: Sequence[tuple[str, str]], title: str) -> str:
    """The page: the PNG inline as a data URI, then the figures. Loads nothing else."""
    image = base64.b64encode(png).decode("ascii")
    table = "\n".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                      for label, value in rows)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
img {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }}
td {{ font-family: monospace; white-space: pre-wrap; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<img alt="the run over time" src="data:image/png;base64,{image}">
<table>
{table}
</table>
</body>
</html>
"""
