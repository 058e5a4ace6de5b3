"""Loss curves as a PNG, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import write_atomic

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def plot_loss(series: dict[str, tuple[list[int], list[float]]], path: str | Path, title: str = "training loss") -> None:
    """Each named loss against the step (one colour each, a legend), log scale on the loss axis,
    written atomically to ``path``."""
    width, height, left, right, top, bottom = 640, 400, 70, 20, 30, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    curves = {name: [(s, math.log10(v)) for s, v in zip(*data) if v > 0 and math.isfinite(v)]
              for name, data in series.items()}
    points = [p for pts in curves.values() for p in pts]
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
    if len(points) >= 2:
        smin, smax = min(p[0] for p in points), max(p[0] for p in points)
        lmin = math.floor(min(p[1] for p in points) * 2) / 2
        lmax = math.ceil(max(p[1] for p in points) * 2) / 2
        lmax += 0.5 if lmax == lmin else 0.0
        sx = (x1 - x0) / max(smax - smin, 1)
        sy = (y0 - y1) / (lmax - lmin)
        for i, (name, pts) in enumerate(curves.items()):
            color = COLORS[i % len(COLORS)]
            if len(pts) >= 2:
                draw.line([(x0 + (s - smin) * sx, y0 - (v - lmin) * sy) for s, v in pts], fill=color, width=2)
            draw.text((x1 - 170, y0 - 14 * (len(curves) - i) - 4), name, fill=color)
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
