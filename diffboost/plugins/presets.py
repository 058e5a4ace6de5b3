"""Named, tested plugin stacks: ``diffboost.apply(pipe, "fast")``.

Each preset is a stack file in ``diffboost/presets/`` (the format of :func:`diffboost.save`), so a
preset can be copied, edited and passed back as ``--plugins FILE``. All three are TaylorSeer with 6
full warm-up steps (the paper's 3 is tuned for 50 steps; at 28 steps the first steps change the
features most) and a full step every 3, 4 or 5 steps:

- ``"safe"``: 13 of 28 steps computed.
- ``"fast"``: 11 of 28.
- ``"turbo"``: 10 of 28.

On the Flux reference model (28 steps, true CFG): 2.1x / 2.5x / 2.7x fewer denoiser FLOPs at
53.9 / 47.8 / 43.6 dB PSNR against the plain images, 1.51x / 1.59x / 1.60x wall
(benchmarks/RESULTS.md, "diffboost bench on the Flux reference model").
"""

from __future__ import annotations

import functools
from typing import Callable

from .base import Plugin
from .stacks import PRESET_DIR, load

_SPEED_ORDER = ("safe", "fast", "turbo")

#: preset name -> a function returning a fresh list of its plugin configs (slowest and safest first)
PRESETS: dict[str, Callable[[], list[Plugin]]] = {
    path.stem: functools.partial(load, path)
    for path in sorted(PRESET_DIR.glob("*.toml"),
                       key=lambda p: (_SPEED_ORDER.index(p.stem) if p.stem in _SPEED_ORDER else len(_SPEED_ORDER), p.stem))
}


def resolve(name: str) -> list[Plugin]:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}") from None
