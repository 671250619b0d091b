"""Checks of ``invoker loadgen --plot`` output (the PNG is opened with matplotlib's reader)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from invoker.loadgen.plot import DPI, HEIGHT_IN, WIDTH_IN


def assert_png_drawn(path: Path,
                     size: tuple[int, int] = (int(HEIGHT_IN * DPI), int(WIDTH_IN * DPI))
                     ) -> None:
    """The PNG has ``size`` (rows, columns; by default the loadgen plot's) and is not blank:
    many colours, real variance."""
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.shape[:2] == size, pixels.shape
    rgb = pixels[..., :3].reshape(-1, 3)
    colours = {tuple(p) for p in rgb[:: max(1, len(rgb) // 50_000)].tolist()}
    assert len(colours) > 20, len(colours)
    assert rgb.std() > 0.05, rgb.std()


def assert_html_self_contained(path: Path, png: Path) -> str:
    """The page holds ``png`` as a data URI and references nothing over the network;
    returns its text."""
    text = path.read_text(encoding="utf-8")
    data_uri = f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"
    assert data_uri in text
    # The rest of the page, not the image's base64, which may spell "+hrEf" (a CI run's did).
    page = text.replace(data_uri, "")
    assert not re.search(r"https?:", page, re.IGNORECASE), "the page names a URL"
    assert not re.search(r"\b(href|@import|url\()", page, re.IGNORECASE)
    sources = re.findall(r"\bsrc\s*=\s*\"([^\"]*)\"", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources
    return text
