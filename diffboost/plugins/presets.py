"""Named, tested plugin stacks: ``diffboost.apply(pipe, "fast")``.

Each preset is a stack file in ``diffboost/presets/`` (the format of :func:`diffboost.save`), so a
preset can be copied, edited and passed back as ``--plugins FILE``. The three form a quality ladder,
each faster than the one before, that adapts to the model at run time: all are
:class:`~diffboost.EasyCache` (whole denoiser calls cached while the output change predicted from the
input change, with the transformation rate measured in the same call, stays under a threshold), so
no schedule is tuned to one model:

- ``"safe"`` aims at >= 45 dB PSNR against the plain pipeline: threshold 0.04, first-order forecast
  of the output, at most 4 cached steps in a row.
- ``"fast"`` aims at >= 38 dB: threshold 0.1, the last output reused, at most 8 in a row.
- ``"turbo"`` aims at >= 30 dB: threshold 0.4, the last output reused, at most 8 in a row.

All keep the first 4 steps and the last one. Chosen on one prompt set of the Flux reference model (for
each preset the setting with the most FLOPs saved that kept its level + 2 dB there), confirmed on
another (benchmarks/RESULTS.md, "The speed-fidelity front"). The thresholds do not carry their
fidelity to every model (cautious on our SD UNet, too bold on our 128 px Flux model): fit them to a
model with :func:`diffboost.calibrate` (``diffboost calibrate --preset NAME``), which keeps the
preset's level.
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
