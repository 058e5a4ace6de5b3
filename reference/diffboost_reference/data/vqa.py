"""Procedural visual question answering: scenes of several shapes and questions about them.

A scene holds one to four small coloured shapes in distinct cells of a 3 x 3 grid, on a plain
background. Every example is fully determined by its seed: the scene, one question about it and the
one-word answer. Four question types, balanced:

- ``color``: "what color is the square ?" (asked about a shape that occurs once) -> a colour
- ``shape``: "what shape is at the top left ?" -> a shape
- ``count``: "how many circles are there ?" -> zero .. four
- ``exists``: "is there a red object ?" -> yes / no (half of each)

The objects cover about a tenth of the image, so most visual tokens show only background: the
setting where visual-token pruning should keep the answer and counting should suffer first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLORS, SHAPES, SUPERSAMPLE, _jitter_color, _polygon

IMAGE_SIZE = 64
#: grid cell name -> centre (x, y) in pixels at 64 x 64
CELLS: dict[str, tuple[float, float]] = {
    f"{row}{' ' if row and col else ''}{col}".strip() or "center": (x, y)
    for row, y in (("top", 11.0), ("", 32.0), ("bottom", 53.0))
    for col, x in (("left", 11.0), ("", 32.0), ("right", 53.0))
}
RADIUS = 7.0  # object radius in pixels at 64 x 64
MAX_OBJECTS = 4
NUMBERS = ("zero", "one", "two", "three", "four")
PLURALS = {s: s + "s" for s in SHAPES}
QUESTION_TYPES = ("color", "shape", "count", "exists")
#: every answer the model may give
ANSWERS: tuple[str, ...] = tuple(COLORS) + SHAPES + NUMBERS + ("yes", "no")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: str


@dataclass(frozen=True)
class Example:
    """One scene with one question and its answer."""

    objects: tuple[Obj, ...]
    background: str
    question: str
    answer: str
    qtype: str
    seed: int

    def image(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """The scene as a uint8 (size, size, 3) array."""
        return render(self.objects, self.background, self.seed, size)

    def pil(self, size: int = IMAGE_SIZE) -> Image.Image:
        return Image.fromarray(self.image(size))


def render(objects: tuple[Obj, ...], background: str, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw the objects (supersampled antialiasing, small jitter of place, size, angle and colour)."""
    rng = random.Random(seed * 104_729 + 3)
    s = SUPERSAMPLE * size / IMAGE_SIZE
    img = Image.new("RGB", (SUPERSAMPLE * size,) * 2, _jitter_color(BACKGROUNDS[background], rng, 8))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        cx, cy = CELLS[obj.cell]
        cx, cy = (cx + rng.uniform(-2, 2)) * s, (cy + rng.uniform(-2, 2)) * s
        r = RADIUS * rng.uniform(0.9, 1.1) * s
        color = _jitter_color(COLORS[obj.color], rng, 12)
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, math.radians(rng.uniform(-10, 10))), fill=color)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def make_example(seed: int, qtype: str | None = None) -> Example:
    """The example of ``seed`` (question type drawn from the seed unless given)."""
    rng = random.Random(seed)
    qtype = qtype or QUESTION_TYPES[seed % len(QUESTION_TYPES)]
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; allowed: {', '.join(QUESTION_TYPES)}")
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(tuple(CELLS), n)
    objects = tuple(Obj(rng.choice(SHAPES), rng.choice(tuple(COLORS)), c) for c in cells)
    background = rng.choice(tuple(BACKGROUNDS))
    if qtype == "color":
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:  # every shape repeats: make the first object's shape unique
            free = [s for s in SHAPES if s not in {o.shape for o in objects}]
            objects = (Obj(rng.choice(free), objects[0].color, objects[0].cell),) + objects[1:]
            unique = [objects[0]]
        obj = rng.choice(unique)
        question, answer = f"what color is the {obj.shape} ?", obj.color
    elif qtype == "shape":
        obj = rng.choice(objects)
        question, answer = f"what shape is at the {obj.cell} ?", obj.shape
    elif qtype == "count":
        shape = rng.choice([o.shape for o in objects]) if rng.random() < 0.8 else rng.choice(SHAPES)
        question = f"how many {PLURALS[shape]} are there ?"
        answer = NUMBERS[sum(o.shape == shape for o in objects)]
    else:
        present = {o.color for o in objects}
        if rng.random() < 0.5:
            color, answer = rng.choice(sorted(present)), "yes"
        else:
            absent = [c for c in COLORS if c not in present]
            color, answer = rng.choice(absent), "no"
        question = f"is there a {color} object ?"
    return Example(objects, background, question, answer, qtype, seed)


def describe(example: Example) -> str:
    """The scene's objects in raster order of their cells, e.g. ``"red circle top left and blue star
    center"`` (the answer of the training-only ``"describe ?"`` task)."""
    order = list(CELLS)
    objects = sorted(example.objects, key=lambda o: order.index(o.cell))
    return " and ".join(f"{o.color} {o.shape} {o.cell}" for o in objects)


DESCRIBE = "describe ?"

#: seeds of training examples start here; held-out sets use 0 .. 999_999 (disjoint)
TRAIN_SEED_BASE = 1_000_000


def held_out(n: int = 512, offset: int = 0) -> list[Example]:
    """A fixed held-out set (seeds below the training range), balanced over the question types."""
    if offset + n > TRAIN_SEED_BASE:
        raise ValueError(f"held-out sets have {TRAIN_SEED_BASE} examples; asked for {offset}+{n}")
    return [make_example(s) for s in range(offset, offset + n)]


def vocabulary() -> list[str]:
    """Every word a question or an answer can contain, sorted."""
    words = {"what", "color", "is", "the", "shape", "at", "how", "many", "are", "there", "a", "object", "?",
             "describe", "and"}
    for cell in CELLS:
        words.update(cell.split())
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(ANSWERS)
    return sorted(words)
