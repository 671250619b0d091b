"""Memory a piece of code takes, measured with tracemalloc: what the worst-case bound's
factors are held to."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def traced(make: Callable[[], T]) -> tuple[T, int, int]:
    """``make()``'s value, the bytes still allocated after it while the value is kept, and the
    peak allocated during it (both counted from just before the call)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        value = make()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        return value, current - before, peak - before
    finally:
        tracemalloc.stop()
