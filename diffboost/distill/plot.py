"""A loss curve as a PNG, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import write_atomic


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "training loss") -> None:
    """Loss against step, log scale on the loss axis, written atomically to ``path``."""
    width, height, left, right, top, bottom = 640, 400, 70, 20, 30, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    pts = [(s, math.log10(v)) for s, v in zip(steps, losses) if v > 0 and math.isfinite(v)]
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
    if len(pts) >= 2:
        smin, smax = min(p[0] for p in pts), max(p[0] for p in pts)
        lmin, lmax = min(p[1] for p in pts), max(p[1] for p in pts)
        lmin, lmax = math.floor(lmin * 2) / 2, math.ceil(lmax * 2) / 2 + (1e-9 if lmin == lmax else 0)
        sx = (x1 - x0) / max(smax - smin, 1)
        sy = (y0 - y1) / (lmax - lmin)
        line = [(x0 + (s - smin) * sx, y0 - (v - lmin) * sy) for s, v in pts]
        draw.line(line, fill=(31, 119, 180), width=2)
        tick = lmin
        while tick <= lmax + 1e-9:
            y = y0 - (tick - lmin) * sy
            draw.line([(x0 - 4, y), (x0, y)], fill="black")
            draw.text((4, y - 6), f"{10 ** tick:.3g}", fill="black")
            tick += 0.5
        draw.text((x0, y0 + 6), str(smin), fill="black")
        draw.text((x1 - 40, y0 + 6), str(smax), fill="black")
    draw.text(((x0 + x1) // 2 - 15, y0 + 20), "step", fill="black")
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
