"""Procedural captioned clips: one coloured shape that moves, grows, shrinks or changes colour.

The video counterpart of :mod:`diffboost_reference.data.scenes` (same shapes, palette, backgrounds
and drawing). Every clip is fully determined by its seed. Captions, e.g.:

- ``"a red circle moving from left to right on a white background"`` (also right to left, top to
  bottom, bottom to top)
- ``"a blue star moving in a circle on a black background"`` (clockwise, starting at the top)
- ``"a green square growing on a gray background"`` / ``"... shrinking ..."``
- ``"a yellow triangle turning purple on a white background"``

:func:`parse_caption` reads the attributes back. Frames: 9 by default (Wan's VAE compresses time by 4:
``4 k + 1`` frames), 64 x 64 pixels.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLORS, SHAPES, SUPERSAMPLE, _jitter_color, _polygon

IMAGE_SIZE = 64
FRAMES = 9
#: straight paths: start and end centre (x, y) at 64 px
PATHS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left to right": ((14.0, 32.0), (50.0, 32.0)),
    "right to left": ((50.0, 32.0), (14.0, 32.0)),
    "top to bottom": ((32.0, 14.0), (32.0, 50.0)),
    "bottom to top": ((32.0, 50.0), (32.0, 14.0)),
}
CIRCLE = "in a circle"
CIRCLE_RADIUS = 16.0
GROW, SHRINK = "growing", "shrinking"
TURN = "turning"
#: every motion class (``turning`` stands for "turning <colour>")
MOTIONS: tuple[str, ...] = (*PATHS, CIRCLE, GROW, SHRINK, TURN)
RADIUS = 9.0  # object radius while it moves (the scenes' "small")
RADII = (6.0, 16.0)  # growing from / shrinking to


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    color: str
    background: str
    motion: str
    #: the colour it turns into (``motion == "turning"`` only)
    color_to: str | None = None

    def caption(self) -> str:
        if self.motion in PATHS:
            a, b = self.motion.split(" to ")
            what = f"moving from {a} to {b}"
        elif self.motion == CIRCLE:
            what = "moving in a circle"
        elif self.motion == TURN:
            what = f"turning {self.color_to}"
        else:
            what = self.motion
        return f"a {self.color} {self.shape} {what} on a {self.background} background"


def random_spec(rng: random.Random) -> ClipSpec:
    motion = rng.choice(MOTIONS)
    color = rng.choice(tuple(COLORS))
    color_to = rng.choice([c for c in COLORS if c != color]) if motion == TURN else None
    return ClipSpec(rng.choice(SHAPES), color, rng.choice(tuple(BACKGROUNDS)), motion, color_to)


def trajectory(spec: ClipSpec, frames: int = FRAMES) -> list[tuple[float, float, float, float]]:
    """Per frame: centre x, y (pixels at 64 px), radius and colour mix (0 = ``color``, 1 = ``color_to``)."""
    out = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        x, y, r, mix = 32.0, 32.0, RADIUS, 0.0
        if spec.motion in PATHS:
            (x0, y0), (x1, y1) = PATHS[spec.motion]
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        elif spec.motion == CIRCLE:  # clockwise on screen, from the top, one full turn over the clip
            angle = 2 * math.pi * t * (frames - 1) / frames
            x, y = 32.0 + CIRCLE_RADIUS * math.sin(angle), 32.0 - CIRCLE_RADIUS * math.cos(angle)
        elif spec.motion == GROW:
            r = RADII[0] + t * (RADII[1] - RADII[0])
        elif spec.motion == SHRINK:
            r = RADII[1] + t * (RADII[0] - RADII[1])
        elif spec.motion == TURN:
            mix = t
        out.append((x, y, r, mix))
    return out


def render(spec: ClipSpec, seed: int = 0, frames: int = FRAMES, size: int = IMAGE_SIZE) -> np.ndarray:
    """The clip as uint8 ``(frames, size, size, 3)``: supersampled drawing, a small jitter of the path,
    angle and colours that stays fixed over the clip (one object, not a flicker)."""
    rng = random.Random(seed * 7_919 + 11)
    s = SUPERSAMPLE * size / IMAGE_SIZE
    bg = _jitter_color(BACKGROUNDS[spec.background], rng, 8)
    c0 = np.array(_jitter_color(COLORS[spec.color], rng, 12), dtype=float)
    c1 = np.array(_jitter_color(COLORS[spec.color_to], rng, 12), dtype=float) if spec.color_to else c0
    dx, dy = rng.uniform(-2, 2), rng.uniform(-2, 2)
    angle = math.radians(rng.uniform(-10, 10))
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i, (x, y, r, mix) in enumerate(trajectory(spec, frames)):
        img = Image.new("RGB", (SUPERSAMPLE * size,) * 2, bg)
        draw = ImageDraw.Draw(img)
        cx, cy, rr = (x + dx) * s, (y + dy) * s, r * s
        color = tuple(int(round(v)) for v in (1 - mix) * c0 + mix * c1)
        if spec.shape == "circle":
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=color)
        else:
            draw.polygon(_polygon(spec.shape, cx, cy, rr, angle), fill=color)
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    return out


@dataclass(frozen=True)
class Clip:
    spec: ClipSpec
    seed: int
    frames: np.ndarray

    @property
    def caption(self) -> str:
        return self.spec.caption()


def make_clip(seed: int, frames: int = FRAMES, size: int = IMAGE_SIZE) -> Clip:
    spec = random_spec(random.Random(seed))
    return Clip(spec, seed, render(spec, seed, frames, size))


#: training clips use seeds from here on; held-out captions use seeds below
TRAIN_SEED_BASE = 1_000_000


def held_out(n: int = 64, offset: int = 0) -> list[ClipSpec]:
    """A fixed held-out caption set (seeds below the training range), every motion equally often."""
    specs = []
    seed = offset
    per = {m: 0 for m in MOTIONS}
    quota = math.ceil(n / len(MOTIONS))
    while len(specs) < n:
        spec = random_spec(random.Random(seed))
        if per[spec.motion] < quota:
            per[spec.motion] += 1
            specs.append(spec)
        seed += 1
        if seed >= TRAIN_SEED_BASE:
            raise ValueError("held-out seeds exhausted")
    return specs


_CAPTION = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) (?:moving from (?P<a>\w+) to (?P<b>\w+)|moving (?P<circle>in a circle)|"
    r"(?P<size>growing|shrinking)|turning (?P<to>\w+)) on a (?P<background>\w+) background$"
)


def parse_caption(caption: str) -> ClipSpec:
    """The clip a caption describes (the inverse of :meth:`ClipSpec.caption`); ``ValueError`` otherwise."""
    m = _CAPTION.match(caption.strip().lower())
    if not m:
        raise ValueError(f"not a clip caption: {caption!r}")
    if m["a"]:
        motion = f"{m['a']} to {m['b']}"
    elif m["circle"]:
        motion = CIRCLE
    elif m["size"]:
        motion = m["size"]
    else:
        motion = TURN
    spec = ClipSpec(m["shape"], m["color"], m["background"], motion, m["to"])
    if (spec.shape not in SHAPES or spec.color not in COLORS or spec.background not in BACKGROUNDS
            or motion not in MOTIONS or (spec.color_to is not None and spec.color_to not in COLORS)):
        raise ValueError(f"unknown attribute in clip caption: {caption!r}")
    return spec


def vocabulary() -> list[str]:
    words = {"a", "moving", "from", "to", "in", "circle", "on", "background", GROW, SHRINK, TURN}
    for motion in PATHS:
        words.update(motion.split())
    words.update(SHAPES)
    words.update(COLORS)
    words.update(BACKGROUNDS)
    return sorted(words)
