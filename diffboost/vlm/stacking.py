"""Which visual-token plugins can be stacked on one vision-language model.

A model takes at most one vision-side pruner (it decides the features the language model sees) and
at most one language-side pruner (FastV); both may be stacked (the language-side one then prunes among
the features the vision-side one kept). Diffusers plugins (caches, samplers, attention kernels) act
on pipelines and are refused here.
"""

from __future__ import annotations

from typing import Sequence

from ..plugins.base import Plugin, PluginKind
from ..plugins.stacking import IncompatiblePluginsError


def check_vlm_stack(plugins: Sequence[Plugin]) -> list[Plugin]:
    """Validate a stack for a vision-language model; returns it vision side first."""
    by_stage: dict[str, Plugin] = {}
    for p in plugins:
        if p.kind != PluginKind.VLM:
            raise IncompatiblePluginsError(
                f"{p.name} is a {p.kind.value} plugin for Diffusers pipelines; a vision-language model takes the "
                "visual-token plugins (HiPrune, HiRED, VisionZip, Downsample, FastV)"
            )
        stage = getattr(p, "stage", "vision")
        other = by_stage.get(stage)
        if other is not None:
            raise IncompatiblePluginsError(
                f"{other.name} and {p.name} both prune the visual tokens {'before' if stage == 'vision' else 'inside'} "
                "the language model; a model takes at most one of each kind"
            )
        by_stage[stage] = p
    return sorted(plugins, key=lambda p: 0 if getattr(p, "stage", "vision") == "vision" else 1)
