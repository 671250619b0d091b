"""Collecting figures: one printed line per figure, a summary block, and a JSON file."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

NAME_WIDTH = 44


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    note: str = ""
    # For ratios: the two figures this one relates (numerator, denominator)
    of: tuple[str, str] | None = None


def fmt_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if float(value).is_integer() and magnitude < 1000:
        return str(int(value))
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


@dataclass
class Results:
    out: TextIO = sys.stdout
    figures: list[Figure] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    def add(self, name: str, value: float | None, unit: str, note: str = "") -> Figure:
        figure = Figure(name, None if value is None else float(value), unit, note)
        self.figures.append(figure)
        self._print(figure)
        return figure

    def ratio(self, name: str, numerator: str, denominator: str, note: str = "") -> Figure:
        a, b = self.get(numerator), self.get(denominator)
        value = None
        if a is not None and b is not None and a.value is not None and b.value:
            value = a.value / b.value
        figure = Figure(name, value, "x", note, (numerator, denominator))
        self.figures.append(figure)
        self._print(figure)
        return figure

    def line(self, figure: Figure) -> str:
        text = f"{figure.name:<{NAME_WIDTH}} {fmt_value(figure.value):>10} {figure.unit}"
        if figure.of is not None:
            parts = []
            for ref in figure.of:
                f = self.get(ref)
                parts.append(f"{ref} = {fmt_value(f.value)} {f.unit}" if f else f"{ref} = n/a")
            text += "   [" + "  /  ".join(parts) + "]"
        if figure.note:
            text += f"   ({figure.note})"
        return text

    def _print(self, figure: Figure) -> None:
        print(self.line(figure), file=self.out, flush=True)

    def error(self, scenario: str, message: str) -> None:
        self.errors.append(f"{scenario}: {message}")
        print(f"!! {scenario}: {message}", file=self.out, flush=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "figures": [
                {k: v for k, v in asdict(f).items() if v not in ("", None) or k == "value"}
                for f in self.figures
            ],
            "series": self.series,
            "errors": self.errors,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.rename(path)
