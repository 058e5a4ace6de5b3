"""Named, tested plugin stacks: ``diffboost.apply(pipe, "fast")``.

All three are TaylorSeer with 6 full warm-up steps (the paper's 3 is tuned for 50 steps; at 28 steps
the first steps change the features most). On the shipped reference model (step 3,500; sweep:
benchmarks/configs/warmup-sweep.toml, numbers in benchmarks/RESULTS.md) they are three points of the
speed/fidelity curve; at equal FLOPs, 6 warm-up steps with a longer interval and 3 warm-up steps with
a shorter one are about as good (interval 4 + warm-up 6: 53.8 dB, interval 3 + warm-up 3: 54.7 dB,
both 2.49x fewer FLOPs); the longer warm-up keeps the fast-changing early steps exact, which
mattered much more on earlier, less smooth checkpoints of the same training run:

- ``"safe"``: a full step every 3 steps (13 of 28 steps computed; 2.1x fewer FLOPs, about 60 dB).
- ``"fast"``: a full step every 4 steps (11 of 28; 2.5x, about 54 dB).
- ``"turbo"``: a full step every 5 steps (10 of 28; 2.7x, about 51 dB).

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
