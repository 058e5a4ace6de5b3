"""TaylorSeer: forecast block features across steps instead of recomputing them.

Paper: "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers".

Schedule (paper symbols in brackets): the first ``warmup`` steps are full; after that one full step
every ``interval`` [N] steps; the steps between are forecast with a Taylor series of order
``order`` [O] built from divided differences on the step index (see :mod:`diffboost.caches.taylor`).
``final_full_steps`` optionally computes the last steps in full.

What is forecast (the *units*):

- transformer blocks: the outputs of each block's attention and feed-forward submodules
  (``attn``, ``attn1``, ``attn2``, ``ff``, ``ff_context``, ``ffn``), i.e. *before* the AdaLN gate;
  the modulation, gates and residual adds still run live, so a forecast step costs a few elementwise
  ops per block. Single-stream blocks (Flux, HunyuanVideo) forecast their fused output projection
  ``proj_out``; their ``attn`` and ``proj_mlp`` are skipped and return their last output (unused).
- UNets: the down/mid/up blocks are the units; only the last up block's output reaches the output
  head, so it is forecast and the other blocks are skipped.
- ``granularity="block"``: each transformer block's residual (output - input, both streams) is
  forecast instead of its submodules' outputs. Coarser (the gates are forecast too), but every hook
  sits at a block boundary: use it with regional ``torch.compile`` of blocks, where module-level
  hooks would break each block's graph at its attention/feed-forward calls.
- ``lite=True``: only the denoiser output is forecast (one forecast per step, least memory).

Each CFG branch (``cache_context("cond"/"uncond")`` or the doubled batch) keeps its own factors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

from ..plugins.adapters import BlockIO, Denoiser, PipelineAdapter
from ..plugins.base import CallStats, Installed, Plugin, PluginKind, check_bools, check_choice, check_int, install_each
from ..plugins.runtime import compiled_around, BranchStates, CallTracker, ClockState, HookSet, StepClock, StepPlan, _all_finite, logger
from .taylor import TaylorFactors

HOOK_NAME = "diffboost.taylorseer"
_FORECAST_CHILDREN = ("attn", "attn1", "attn2", "attention", "ff", "ff_context", "ffn", "feed_forward")


@dataclasses.dataclass(frozen=True)
class TaylorSeer(Plugin):
    """TaylorSeer feature forecasting.

    Args:
        interval: N, full steps happen every ``interval`` steps after warmup (>= 1; 1 = never
            forecast, bit-identical to the unpatched pipeline). Default 5.
        order: O, Taylor order of the forecast, 0-4 (0 = plain reuse, as FORA). Default 1.
        warmup: full steps at the start of every call (>= 0). Default 3.
        final_full_steps: full steps at the end of every call (>= 0). Default 0.
        lite: forecast only the denoiser output instead of per-block features. Default False.
        granularity: ``"module"`` (attention / feed-forward outputs before the gates, as in the
            paper) or ``"block"`` (block residuals; compile-friendly). Default "module".
        check_finite: recompute a forecast step whose output has NaN/Inf (logged once). Default True.
    """

    kind: ClassVar[PluginKind] = PluginKind.CACHE
    strength: ClassVar[str | None] = "interval"

    interval: int = 5
    order: int = 1
    warmup: int = 3
    final_full_steps: int = 0
    lite: bool = False
    granularity: str = "module"
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_bools(self)
        check_int(self, "interval", 1, 1000)
        check_int(self, "order", 0, 4)
        check_int(self, "warmup", 0, 10_000)
        check_int(self, "final_full_steps", 0, 10_000)
        check_choice(self, "granularity", ("module", "block"))

    def never_skips(self) -> bool:
        return self.interval == 1

    def policy(self, st: ClockState, step: int, steps_left: int | None) -> bool:
        if step < self.warmup:
            return True
        if steps_left is not None and steps_left <= self.final_full_steps:
            return True
        return step - st.last_full >= self.interval

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        return install_each(adapter, lambda d: _install_taylorseer(self, d, adapter, tracker))


class _UnitState(BaseState):
    def __init__(self, order: int):
        self.order = order
        self.reset()

    def reset(self) -> None:
        self.factors = TaylorFactors(self.order)
        self.last: Any = None


class _UnitCalls(BaseState):
    """One series per call of a unit within a denoiser call: a block may run one module on two
    streams (CogView4's feed-forward runs on the image tokens, then on the text tokens)."""

    def __init__(self, order: int):
        self.order = order
        self.reset()

    def reset(self) -> None:
        self.calls: list[_UnitState] = []
        self.run = -1  # the denoiser call (StepPlan.run) the index counts in
        self.index = 0

    def next(self, run: int) -> _UnitState:
        if run != self.run:
            self.run, self.index = run, 0
        if self.index == len(self.calls):
            self.calls.append(_UnitState(self.order))
        st = self.calls[self.index]
        self.index += 1
        return st


@compiled_around("new_forward")
class ForecastUnitHook(ModelHook):
    """Runs the unit on full steps (recording it) and forecasts it, or returns its last output, otherwise."""

    _is_stateful = True

    def __init__(self, clock: StepClock, order: int, forecast: bool):
        super().__init__()
        self.clock = clock
        self.forecast = forecast
        self.state = BranchStates(_UnitCalls, init_args=(order,))

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan: StepPlan = self.clock.plan
        st: _UnitState = self.state.get_state().next(plan.run)
        ready = st.factors.ready if self.forecast else st.last is not None
        if plan.full or not ready:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.forecast:
                st.factors.update(out, plan.step)
            else:
                st.last = out
            return out
        return st.factors.forecast(plan.step) if self.forecast else st.last

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


@compiled_around("new_forward")
class BlockForecastHook(ModelHook):
    """Forecasts a whole transformer block as its residual: out = in + R_hat (both streams)."""

    _is_stateful = True

    def __init__(self, clock: StepClock, order: int, io: BlockIO):
        super().__init__()
        self.clock = clock
        self.io = io
        self.state = BranchStates(_UnitState, init_args=(order,))

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan: StepPlan = self.clock.plan
        st: _UnitState = self.state.get_state()
        h, e = self.io.inputs(args, kwargs)
        if plan.full or not st.factors.ready:
            out = self.fn_ref.original_forward(*args, **kwargs)
            h_out, e_out = self.io.split(out)
            st.last = e_out is None  # the block drops the text stream (e.g. SD3's last block)
            st.factors.update((h_out - h, None if (e_out is None or e is None) else e_out - e), plan.step)
            return out
        res_h, res_e = st.factors.forecast(plan.step)
        e_out = None if st.last else (e + res_e if res_e is not None else e)
        return self.io.join(h + res_h, e_out)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


@compiled_around("new_forward")
class OutputForecastClock(StepClock):
    """Lite mode: the step clock itself forecasts the whole denoiser output on forecast steps."""

    def __init__(self, tracker: CallTracker, policy: Any, order: int, check_finite: bool):
        super().__init__(tracker, policy, check_finite, name="TaylorSeer(lite)")
        self.outputs = BranchStates(_UnitState, init_args=(order,))

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.begin()
        st: _UnitState = self.outputs.get_state()
        if not plan.full:
            out = st.factors.forecast(plan.step)
            if not self.check_finite or _all_finite(out):
                self.end(False)
                return out
            if not self._warned:
                logger.warning("TaylorSeer(lite): forecast at step %d has NaN/Inf; computing it in full", plan.step)
                self._warned = True
            self.state.get_state().fallbacks += 1
            plan.full, plan.forced = True, True
        out = self.fn_ref.original_forward(*args, **kwargs)
        st.factors.update(out, plan.step)
        self.end(True)
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.outputs.reset()
        return super().reset_state(module)


class HookedCache(Installed):
    """Hooks of one cache plugin on one denoiser."""

    def __init__(
        self,
        plugin: Plugin,
        denoiser: Denoiser,
        hooks: HookSet,
        clock: StepClock,
        skipped_params: int,
        roles: dict[str, list[torch.nn.Module]] | None = None,
    ):
        self.plugin = plugin
        self.denoiser = denoiser
        self.hooks = hooks
        self.clock = clock
        self.skipped_share = skipped_params / max(1, sum(p.numel() for p in denoiser.module.parameters()))
        names = {id(m): n or "<denoiser>" for n, m in denoiser.module.named_modules()}
        self.roles = {role: [names[id(m)] for m in mods] for role, mods in (roles or {}).items()}

    def reset(self) -> None:
        self.hooks.reset()

    def remove(self) -> None:
        self.hooks.remove()

    def call_stats(self) -> CallStats:
        details = self.stats()
        branches = details["branches"]
        forecast = sorted({s for b in branches.values() for s in range(b["steps"]) if s not in b["full_steps"]})
        return CallStats(details["plugin"], {name: b["forecast"] for name, b in branches.items()}, tuple(forecast), details)

    def stats(self) -> dict[str, Any]:
        branches = self.clock.stats()
        total = sum(b["steps"] for b in branches.values())
        skipped = sum(b["forecast"] for b in branches.values())
        return {
            "denoiser": self.denoiser.attr,
            "plugin": repr(self.plugin),
            "branches": branches,
            "hooked_modules": len(self.hooks.modules),
            # which modules run on forecast/reused steps and which are forecast or skipped
            "modules": self.roles,
            # parameter share of the skipped modules x share of skipped steps: a proxy for FLOPs saved
            # (linear layers dominate); `diffboost bench` counts real FLOPs.
            "flops_saved_est": round(self.skipped_share * skipped / total, 4) if total else 0.0,
        }


def _install_taylorseer(cfg: TaylorSeer, d: Denoiser, adapter: PipelineAdapter, tracker: CallTracker) -> HookedCache:
    hooks = HookSet(HOOK_NAME, d.module)
    if cfg.lite:
        clock = OutputForecastClock(tracker, cfg.policy, cfg.order, cfg.check_finite)
        hooks.add(d.module, clock)
        skipped = sum(p.numel() for p in d.module.parameters())
        return HookedCache(cfg, d, hooks, clock, skipped, {"forecast": [d.module]})

    units: list[tuple[torch.nn.Module, bool]] = []
    ios: list[BlockIO] | None = None  # block granularity: each block's layout
    if adapter.kind == "unet":
        units = [(block, block is d.blocks[-1]) for block in d.blocks]
    elif cfg.granularity == "block":
        ios = [d.block_io(block) for block in d.blocks]  # refuses an unknown layout before any hook
    else:
        for block in d.blocks:
            units.extend(_transformer_units(block))
        if not units:
            raise ValueError(
                f"TaylorSeer found no attention/feed-forward modules (children named {', '.join(_FORECAST_CHILDREN)}) "
                f"in the blocks of {type(d.module).__name__}; use TaylorSeer(granularity='block') or TaylorSeer(lite=True)"
            )
    clock = StepClock(tracker, cfg.policy, cfg.check_finite, name="TaylorSeer")
    hooks.add(d.module, clock)
    if ios is not None:
        for block, io in zip(d.blocks, ios):
            hooks.add(block, BlockForecastHook(clock, cfg.order, io))
        skipped = sum(p.numel() for b in d.blocks for p in b.parameters())
        return HookedCache(cfg, d, hooks, clock, skipped, {"forecast": list(d.blocks)})
    for module, forecast in units:
        hooks.add(module, ForecastUnitHook(clock, cfg.order, forecast))
    # a UNet's units are its blocks: everything they compute is skipped on forecast steps
    skipped = sum(p.numel() for m, _ in units for p in m.parameters())
    roles = {
        "forecast": [m for m, f in units if f],
        "skipped (output unused on forecast steps)": [m for m, f in units if not f],
    }
    return HookedCache(cfg, d, hooks, clock, skipped, roles)


def _transformer_units(block: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    children = dict(block.named_children())
    if isinstance(children.get("proj_out"), torch.nn.Module) and isinstance(children.get("proj_mlp"), torch.nn.Module):
        # single-stream block: out = gate * proj_out(cat(attn(x), mlp(x))): forecast proj_out
        units = [(children["proj_out"], True), (children["proj_mlp"], False)]
        if isinstance(children.get("attn"), torch.nn.Module):
            units.append((children["attn"], False))
        return units
    return [(children[n], True) for n in _FORECAST_CHILDREN if isinstance(children.get(n), torch.nn.Module)]
