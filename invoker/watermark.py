"""Pause/resume decision with hysteresis (pure)."""

from __future__ import annotations


class Hysteresis:
    """``saturated`` turns on at ``high`` and off only at or below ``low``.

    Without the gap the feed would flap between pause and resume on every record.
    """

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low < high, got low={low} high={high}")
        self.high = high
        self.low = low
        self.saturated = False

    def update(self, level: int) -> bool:
        if self.saturated:
            if level <= self.low:
                self.saturated = False
        elif level >= self.high:
            self.saturated = True
        return self.saturated
