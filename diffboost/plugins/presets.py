"""Named, tested plugin stacks: ``diffboost.apply(pipe, "fast")``.

- ``"safe"``: adaptive first-block cache with a conservative threshold and Taylor-calibrated
  residuals; reuses a step only when the front block barely changed.
- ``"fast"``: TaylorSeer, a full step every 3 steps, first-order forecast.
- ``"turbo"``: TaylorSeer, a full step every 5 steps, first-order forecast.

Measured speed and fidelity of each on the reference model: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from ..caches.block_cache import AdaptiveBlockCache
from ..caches.taylorseer import TaylorSeer
from .base import Plugin


def _safe() -> list[Plugin]:
    return [AdaptiveBlockCache(threshold=0.05, warmup=3, max_cached_steps=2, taylor_order=1)]


def _fast() -> list[Plugin]:
    return [TaylorSeer(interval=3, order=1, warmup=3)]


def _turbo() -> list[Plugin]:
    return [TaylorSeer(interval=5, order=1, warmup=3)]


PRESETS = {"safe": _safe, "fast": _fast, "turbo": _turbo}


def resolve(name: str) -> list[Plugin]:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}") from None
