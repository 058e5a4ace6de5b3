"""Procedural captioned scenes: coloured shapes on a plain background.

Every scene is fully determined by a seed. A scene holds one object (or two, on
request) described by shape, colour, size and position, on a coloured
background. Captions are plain English, e.g.
``"a large red circle at the left on a white background"``, and
:func:`parse_caption` reads the attributes back from any such caption.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES: dict[str, float] = {"small": 9.0, "large": 16.0}  # radius in pixels at 64x64
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}

#: Attribute name -> ordered list of values (index = class id for the evaluator).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

IMAGE_SIZE = 64
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene."""

    shape: str
    color: str
    size: str
    position: str

    def phrase(self) -> str:
        """English noun phrase, e.g. ``"a large red circle at the left"``."""
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class SceneSpec:
    """A scene: objects on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    @property
    def caption(self) -> str:
        """Plain-English caption of the scene."""
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"

    def attributes(self) -> dict[str, str]:
        """Flat attribute dict of the first object plus the background."""
        first = self.objects[0]
        return {
            "shape": first.shape,
            "color": first.color,
            "size": first.size,
            "position": first.position,
            "background": self.background,
        }


@dataclass
class Scene:
    """A rendered scene: image, attributes of the first object, caption and spec."""

    image: np.ndarray  # uint8, (H, W, 3)
    attributes: dict[str, str]
    caption: str
    spec: SceneSpec = field(repr=False)

    def pil(self) -> Image.Image:
        """The image as a PIL image."""
        return Image.fromarray(self.image)


def random_spec(rng: random.Random, two_objects: bool = False) -> SceneSpec:
    """Draw a scene description uniformly over all attribute values."""
    edges = [p for p in POSITIONS if p != "center"]
    first = ObjectSpec(
        rng.choice(SHAPES),
        rng.choice(tuple(COLORS)),
        rng.choice(tuple(SIZES)),
        rng.choice(edges if two_objects else tuple(POSITIONS)),
    )
    objects = [first]
    if two_objects:  # the second object is small and sits on another edge
        pos = rng.choice([p for p in edges if p != first.position])
        objects.append(ObjectSpec(rng.choice(SHAPES), rng.choice(tuple(COLORS)), "small", pos))
    return SceneSpec(tuple(objects), rng.choice(tuple(BACKGROUNDS)))


def _jitter_color(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r * 0.86 * math.sqrt(2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r * 1.1) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r * 1.1 if k % 2 == 0 else r * 0.45) for k in range(10)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    out = []
    for a, rr in pts:
        a += angle
        out.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    if shape == "triangle":  # centre the triangle's bounding box vertically
        ys = [p[1] for p in out]
        dy = cy - (min(ys) + max(ys)) / 2
        out = [(x, y + dy) for x, y in out]
    return out


def render(spec: SceneSpec, seed: int = 0, size: int = IMAGE_SIZE, jitter: bool = True) -> np.ndarray:
    """Render a scene description to a uint8 (size, size, 3) array (supersampled antialiasing)."""
    rng = random.Random(seed * 7919 + 17)
    s = SUPERSAMPLE * size / IMAGE_SIZE
    big = SUPERSAMPLE * size
    bg = _jitter_color(BACKGROUNDS[spec.background], rng, 8 if jitter else 0)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for obj in spec.objects:
        r = SIZES[obj.size] * (rng.uniform(0.9, 1.1) if jitter else 1.0)
        cx, cy = POSITIONS[obj.position]
        if jitter:
            cx += rng.uniform(-3, 3)
            cy += rng.uniform(-3, 3)
        angle = math.radians(rng.uniform(-10, 10)) if jitter else 0.0
        color = _jitter_color(COLORS[obj.color], rng, 12 if jitter else 0)
        cx, cy, r = cx * s, cy * s, r * s
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=color)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def make_scene(seed: int, two_objects: bool = False, size: int = IMAGE_SIZE) -> Scene:
    """Deterministic scene for a seed; ``size`` px square (the same scene at any size, scaled)."""
    spec = random_spec(random.Random(seed), two_objects=two_objects)
    return Scene(render(spec, seed, size), spec.attributes(), spec.caption, spec)


def make_batch(
    seeds: list[int] | range, two_objects: bool = False, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[Scene]]:
    """Render several scenes; returns a uint8 (N, H, W, 3) array and the scenes."""
    scenes = [make_scene(int(s), two_objects, size) for s in seeds]
    return np.stack([sc.image for sc in scenes]), scenes


_OBJECT_RE = re.compile(
    r"an? (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) at the (?P<position>\w+)"
)
_BG_RE = re.compile(r"on an? (?P<background>\w+) background")


def parse_spec(caption: str) -> SceneSpec:
    """Parse a caption into a :class:`SceneSpec`; raises ``ValueError`` if it does not parse."""
    text = caption.strip().lower()
    bg = _BG_RE.search(text)
    objects = []
    for m in _OBJECT_RE.finditer(text):
        d = m.groupdict()
        for key in ("shape", "color", "size", "position"):
            if d[key] not in ATTRIBUTES[key]:
                raise ValueError(f"unknown {key} {d[key]!r} in {caption!r}")
        objects.append(ObjectSpec(d["shape"], d["color"], d["size"], d["position"]))
    if not objects or bg is None or bg.group("background") not in BACKGROUNDS:
        raise ValueError(f"cannot parse caption {caption!r}")
    return SceneSpec(tuple(objects), bg.group("background"))


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes (first object + background) named by a caption."""
    return parse_spec(caption).attributes()


def all_specs() -> list[SceneSpec]:
    """Every single-object scene description, in a fixed order."""
    return [
        SceneSpec((ObjectSpec(sh, co, si, po),), bg)
        for sh in SHAPES
        for co in COLORS
        for si in SIZES
        for po in POSITIONS
        for bg in BACKGROUNDS
    ]


def benchmark_prompts(n: int = 32, seed: int = 0) -> list[str]:
    """A fixed, balanced list of ``n`` single-object prompts (same for the same ``n`` and ``seed``)."""
    rng = random.Random(10_000 + seed)
    specs = all_specs()
    rng.shuffle(specs)
    out: list[str] = []
    while len(out) < n:
        out.extend(s.caption for s in specs[: n - len(out)])
    return out


def vocabulary() -> list[str]:
    """Every word that captions can contain, sorted."""
    words = {"a", "an", "at", "the", "on", "and", "background"}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)
