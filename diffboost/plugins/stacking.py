"""The stacking rules of plugins, in one place, enforced by :func:`diffboost.apply`.

Order of installation (inner to outer): attention kernels -> token reduction -> caches -> step
skipping -> samplers. Inner plugins change *how* a module computes, outer ones *whether* and
*where* it is computed, so each sees the one below as the model:

1. ``ATTENTION`` (at most one): attention processors of the denoiser are replaced; every other plugin
   works unchanged on top.
2. ``TOKENS`` (at most one): tokens merged/pruned inside blocks; composes with caches (a cache stores
   the reduced block's outputs).
3. ``CACHE`` (at most one: TaylorSeer, AdaptiveBlockCache, ErrorControlledCache all own the same
   block features): decides per *denoiser call* what inside the denoiser runs.
4. ``STEP`` (at most one, e.g. SADA): decides per *solver step* whether the denoiser is called at
   all. A cache then only sees the calls that happen, so nothing is counted twice.
   SADA + a cache: SADA's denoiser hook is the outermost, so on a SADA-skipped step neither the
   denoiser nor the cache's hooks run; the cache's step counter (warmup, interval, Taylor distances,
   ``final_full_steps``) counts the denoiser calls that happen, and ``describe`` reports the skipped
   step under SADA only (cache steps + SADA skips = solver steps). SADA reads the denoiser output the
   cache produced (full or forecast) as the model's output.
5. ``SAMPLER`` (at most one, e.g. bottleneck sampling, one-step generators): owns the schedule
   (a sampler's ``refuses`` names kinds it cannot sit on: ``OneStep`` refuses caches and step plugins);
   caches and step plugins reset their state at every resolution switch. SADA + bottleneck
   sampling: the sampler integrates its stages on its own sigmas and hands each step to SADA
   (``solve_flow_step``), which decides skips in the pipeline's step indices in every stage.
6. ``VLM`` plugins act on Transformers vision-language models and cannot be stacked with Diffusers
   pipeline plugins.
"""

from __future__ import annotations

from typing import Sequence

from .base import Plugin, PluginKind

ORDER: tuple[PluginKind, ...] = (
    PluginKind.ATTENTION,
    PluginKind.TOKENS,
    PluginKind.CACHE,
    PluginKind.STEP,
    PluginKind.SAMPLER,
)

#: kinds of which a stack may hold at most one plugin
SINGLETON_KINDS = frozenset(ORDER)

#: pairs of plugin class names that cannot be stacked, with the reason
CONFLICTS: dict[frozenset[str], str] = {}


class IncompatiblePluginsError(ValueError):
    """The requested plugins cannot be stacked."""


def check_stack(plugins: Sequence[Plugin]) -> list[Plugin]:
    """Validate a stack and return it in installation order."""
    by_kind: dict[PluginKind, Plugin] = {}
    for p in plugins:
        if p.kind == PluginKind.VLM:
            raise IncompatiblePluginsError(
                f"{p.name} acts on Transformers vision-language models; use diffboost.apply(model, ...) "
                "on the model, not on a Diffusers pipeline"
            )
        other = by_kind.get(p.kind)
        if other is not None and p.kind in SINGLETON_KINDS:
            raise IncompatiblePluginsError(
                f"{other.name} and {p.name} are both {p.kind.value} plugins and a stack holds at most one "
                f"{p.kind.value} plugin (see diffboost.plugins.stacking)"
            )
        by_kind[p.kind] = p
    for p in plugins:
        for kind, why in p.refuses.items():
            if kind in by_kind:
                raise IncompatiblePluginsError(f"{p.name} cannot be stacked with {by_kind[kind].name} "
                                               f"({kind.value} plugin): {why}")
    names = [p.name for p in plugins]
    for pair, why in CONFLICTS.items():
        if pair <= set(names):
            a, b = sorted(pair)
            raise IncompatiblePluginsError(f"{a} cannot be stacked with {b}: {why}")
    return sorted(plugins, key=lambda p: ORDER.index(p.kind))
