"""Named, tested plugin stacks: ``diffboost.apply(pipe, "fast")``.

All three are TaylorSeer with 6 full warm-up steps: on the Flux reference model at 28 steps the first
steps change the features most, and 6 warm-up steps instead of the paper's 3 (tuned for 50 steps) buy
far more fidelity per full step than any other setting we tried, adaptive block caches and
error-controlled refresh included (sweep: benchmarks/configs/warmup-sweep.toml, numbers in
benchmarks/RESULTS.md):

- ``"safe"``: a full step every 3 steps (13 of 28 steps computed).
- ``"fast"``: a full step every 4 steps (11 of 28).
- ``"turbo"``: a full step every 5 steps (10 of 28).

Measured speed and fidelity of each on the reference model: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from ..caches.taylorseer import TaylorSeer
from .base import Plugin


def _safe() -> list[Plugin]:
    return [TaylorSeer(interval=3, order=1, warmup=6)]


def _fast() -> list[Plugin]:
    return [TaylorSeer(interval=4, order=1, warmup=6)]


def _turbo() -> list[Plugin]:
    return [TaylorSeer(interval=5, order=1, warmup=6)]


PRESETS = {"safe": _safe, "fast": _fast, "turbo": _turbo}


def resolve(name: str) -> list[Plugin]:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}") from None
