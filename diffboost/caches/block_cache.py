"""Adaptive block caching: compute the front blocks, reuse the middle ones when little changed.

First-block cache (FBCache) and its dual-block extension (DBCache), with optional Taylor
calibration of the reused residual:

- every step computes the first ``front_blocks`` [Fn] blocks; their residual
  r = h_out(Fn) - h_in(0) is compared with the residual of the last full step:

      rel = mean|r - r_ref| / mean|r_ref|

- if rel < ``threshold`` (and the step is past ``warmup``, fewer than ``max_consecutive_skips`` steps in a
  row were reused, and it is not one of the ``final_full_steps``) the middle blocks are skipped: their
  cached residual R = h_out(middle) - h_in(middle) from the last full step is added to the live input
  (Taylor-forecast to the current step when ``taylor_order`` > 0), for the hidden and the text stream;
- the last ``back_blocks`` [Bn] blocks always run, correcting the reused features.

UNets (SD 1.x/2.x, SDXL) use their down/mid/up blocks as the units: the gate reads the output of the
first down block, and on a reused step the last middle unit returns its cached output (the deep
features, as DeepCache does) while the skip connections of the front block stay live.

:class:`ErrorControlledCache` (beyond the anchors) shares this machinery but gates on the *forecast
error* of the probe blocks instead of their change: a step is forecast only while the Taylor
forecast of the probe's residual, made from the last full steps, matches its live value within
``tolerance``. Refresh steps are thus placed where the trajectory bends, not at a fixed interval.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

from ..plugins.adapters import BlockIO, Denoiser, PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import Installed, Plugin, PluginKind, check_bools, check_float, check_int, install_each, renamed_fields
from ..plugins.runtime import compiled_around, BranchStates, CallTracker, HookSet, StepClock
from .taylor import TaylorFactors
from .taylorseer import HookedCache

HOOK_NAME = "diffboost.block_cache"


@renamed_fields(max_cached_steps="max_consecutive_skips")
@dataclasses.dataclass(frozen=True)
class AdaptiveBlockCache(Plugin):
    """First/dual-block adaptive cache (FBCache when ``back_blocks=0``, DBCache otherwise).

    Args:
        threshold: reuse the middle blocks while the relative L1 change of the front blocks'
            residual is below this (>= 0; 0 = never reuse, bit-identical). Default 0.08.
        front_blocks: Fn, blocks always computed at the front (>= 1). Default 1.
        back_blocks: Bn, blocks always computed at the back (>= 0). Default 0.
        warmup: full steps at the start of every call (>= 0). Default 4.
        max_consecutive_skips: most consecutive reused steps (>= 1). Default 3.
        taylor_order: 0 reuses the cached residual as is; 1-4 forecasts it with a Taylor series
            over the last full steps (TaylorSeer calibration). Default 0.
        final_full_steps: full steps at the end of every call (>= 0). Default 0.
        check_finite: recompute a reused step whose output has NaN/Inf. Default True.
    """

    kind: ClassVar[PluginKind] = PluginKind.CACHE
    strength: ClassVar[str | None] = "threshold"

    threshold: float = 0.08
    front_blocks: int = 1
    back_blocks: int = 0
    warmup: int = 4
    max_consecutive_skips: int = 3
    taylor_order: int = 0
    final_full_steps: int = 0
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_bools(self)
        check_float(self, "threshold", 0.0, 10.0)
        check_int(self, "front_blocks", 1, 1000)
        check_int(self, "back_blocks", 0, 1000)
        check_int(self, "warmup", 0, 10_000)
        check_int(self, "max_consecutive_skips", 1, 10_000)
        check_int(self, "taylor_order", 0, 4)
        check_int(self, "final_full_steps", 0, 10_000)

    def never_skips(self) -> bool:
        return self.threshold == 0

    def _settings(self) -> "_Settings":
        return _Settings(
            gate="change",
            threshold=self.threshold,
            front=self.front_blocks,
            back=self.back_blocks,
            warmup=self.warmup,
            max_cached=self.max_consecutive_skips,
            order=self.taylor_order,
            final_full=self.final_full_steps,
            check_finite=self.check_finite,
        )

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        settings = self._settings()
        return install_each(adapter, lambda d: _install(self, settings, d, adapter, tracker))


@renamed_fields(max_forecast_steps="max_consecutive_skips")
@dataclasses.dataclass(frozen=True)
class ErrorControlledCache(Plugin):
    """TaylorSeer-style forecasting whose refresh steps are chosen by a cheap error estimate.

    Every step computes the first ``probe_blocks`` blocks. Their residual is also forecast from the
    last full steps (Taylor order ``order``); the relative L1 error of that forecast,
    mean|r - r_hat| / mean|r|, estimates how well the rest of the network would be forecast. Below
    ``tolerance`` the remaining blocks' residual is forecast; above it the step is computed in full.

    Args:
        tolerance: largest accepted relative forecast error of the probe (>= 0; 0 = never forecast,
            bit-identical). Default 0.05.
        order: Taylor order of both forecasts, 0-4. Default 1.
        probe_blocks: blocks computed every step to estimate the error (>= 1). Default 1.
        warmup: full steps at the start (>= 0; at least order + 1 is sensible). Default 3.
        max_consecutive_skips: most consecutive forecast steps (>= 1). Default 6.
        final_full_steps: full steps at the end (>= 0). Default 1.
        check_finite: recompute a forecast step whose output has NaN/Inf. Default True.
    """

    kind: ClassVar[PluginKind] = PluginKind.CACHE
    strength: ClassVar[str | None] = "tolerance"

    tolerance: float = 0.05
    order: int = 1
    probe_blocks: int = 1
    warmup: int = 3
    max_consecutive_skips: int = 6
    final_full_steps: int = 1
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_bools(self)
        check_float(self, "tolerance", 0.0, 10.0)
        check_int(self, "order", 0, 4)
        check_int(self, "probe_blocks", 1, 1000)
        check_int(self, "warmup", 0, 10_000)
        check_int(self, "max_consecutive_skips", 1, 10_000)
        check_int(self, "final_full_steps", 0, 10_000)

    def never_skips(self) -> bool:
        return self.tolerance == 0

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        settings = _Settings(
            gate="forecast_error",
            threshold=self.tolerance,
            front=self.probe_blocks,
            back=0,
            warmup=self.warmup,
            max_cached=self.max_consecutive_skips,
            order=self.order,
            final_full=self.final_full_steps,
            check_finite=self.check_finite,
        )
        return install_each(adapter, lambda d: _install(self, settings, d, adapter, tracker))


@dataclasses.dataclass(frozen=True)
class _Settings:
    gate: str  # "change" | "forecast_error"
    threshold: float
    front: int
    back: int
    warmup: int
    max_cached: int
    order: int
    final_full: int
    check_finite: bool


class _State(BaseState):
    def __init__(self, order: int):
        self.order = order
        self.reset()

    def reset(self) -> None:
        self.head_in: torch.Tensor | None = None
        self.ref: torch.Tensor | None = None  # probe residual of the last full step ("change" gate)
        self.ref_factors = TaylorFactors(self.order)  # probe residual factors ("forecast_error" gate)
        self.mid_in: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.mid_out_has_encoder = True
        # the text and image streams are joined into one between the first and the last middle block
        # (Chroma, AuraFlow, Flux2: dual-stream blocks, then single-stream blocks on cat([text, image]))
        self.joined = False
        self.res = TaylorFactors(self.order)  # middle residual (DiT) or last middle output (UNet)
        self.stale: dict[int, Any] = {}
        self.consecutive = 0
        self.rel: list[float] = []


@compiled_around("gate", recursive=True)
class _Core:
    """State and decisions shared by the hooks of one block cache on one denoiser."""

    def __init__(self, settings: _Settings, clock: StepClock, unet: bool):
        self.s = settings
        self.clock = clock
        self.unet = unet
        self.state = BranchStates(_State, init_args=(settings.order,))

    def gate(self, probe: torch.Tensor) -> None:
        """Called after the front blocks: decide whether the middle blocks run this step.

        Host-side bookkeeping with one device sync (the decision), kept out of ``torch.compile``.
        """
        s, plan, st = self.s, self.clock.plan, self.state.get_state()
        full = True
        allowed = (
            not plan.forced
            and st.res.ready
            and plan.step >= s.warmup
            and st.consecutive < s.max_cached
            and (plan.steps_left is None or plan.steps_left > s.final_full)
        )
        if allowed:
            if s.gate == "change" and st.ref is not None:
                rel = _rel_l1(probe, st.ref, st.ref)
            elif s.gate == "forecast_error" and st.ref_factors.ready:
                rel = _rel_l1(probe, st.ref_factors.forecast(plan.step), probe)
            else:
                rel = float("inf")
            st.rel.append(rel)
            full = not rel < s.threshold
        if full:
            st.consecutive = 0
            if s.gate == "change":
                st.ref = probe.detach()
            else:
                st.ref_factors.update(probe, plan.step)
        else:
            st.consecutive += 1
        plan.full = full
        plan.k = 0 if full else plan.step - self.clock.state.get_state().last_full


def _rel_l1(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> float:
    num = (x.float() - y.float()).abs().mean()
    den = ref.float().abs().mean()
    return float(num / den) if float(den) > 0 else float("inf")


class _BlockHook(ModelHook):
    _is_stateful = True

    def __init__(self, core: _Core):
        super().__init__()
        self.core = core
        self.state = core.state  # exposed so that diffusers' cache_context reaches it

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


@compiled_around("new_forward")
class FrontBlockHook(_BlockHook):
    """Front [Fn] blocks: always computed; the last one gates the step."""

    def __init__(self, core: _Core, io: BlockIO | None, first: bool, last: bool):
        super().__init__(core)
        self.io, self.first, self.last = io, first, last

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.first and not self.core.unet:
            self.state.get_state().head_in = self.io.inputs(args, kwargs)[0]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            if self.core.unet:
                probe = out[0] if isinstance(out, tuple) else out
            else:
                probe = self.io.split(out)[0] - self.state.get_state().head_in
            self.core.gate(probe)
        return out


@compiled_around("new_forward")
class MiddleBlockHook(_BlockHook):
    """Middle blocks: computed on full steps, replaced by the cached residual/output otherwise."""

    def __init__(self, core: _Core, io: BlockIO | None, index: int, first: bool, last: bool):
        super().__init__(core)
        self.io, self.index, self.first, self.last = io, index, first, last

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.core.clock.plan
        st: _State = self.state.get_state()
        if self.core.unet:
            return self._unet(st, plan, args, kwargs)
        if plan.full:
            if self.first:
                st.mid_in = self.io.inputs(args, kwargs)
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.last:
                h, e = self.io.split(out)
                h0, e0 = st.mid_in
                st.joined = h.shape != h0.shape
                if st.joined:
                    h0, e0 = joined_input(h0, e0, h, module), None
                st.mid_out_has_encoder = e is not None
                res_e = e - e0 if (e is not None and e0 is not None) else None
                st.res.update((h - h0, res_e), plan.step)
                st.mid_in = None
            return out
        h, e = self.io.inputs(args, kwargs)
        # on a reused step every middle block passes its input through; the residual is added where the
        # stream it was measured on exists: at the first middle block, or at the last one when the
        # streams were joined in between (its input is then the joined stream)
        if (self.first and not st.joined) or (self.last and st.joined):
            res_h, res_e = st.res.forecast(plan.step) if self.core.s.order else st.res.latest()
            h = h + res_h
            if res_e is not None and e is not None:
                e = e + res_e
        if self.last and not st.mid_out_has_encoder:
            e = None
        return self.io.join(h, e)

    def _unet(self, st: _State, plan: Any, args: tuple, kwargs: dict) -> Any:
        if plan.full:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.last:
                st.res.update(out, plan.step)
            else:
                st.stale[self.index] = out
            return out
        if self.last:
            return st.res.forecast(plan.step) if self.core.s.order else st.res.latest()
        return st.stale[self.index]


def joined_input(h0: torch.Tensor, e0: torch.Tensor | None, h: torch.Tensor, block: torch.nn.Module) -> torch.Tensor:
    """The first middle block's input as the joined stream the last one returns: ``cat([text, image])``
    along the tokens, the order diffusers' single-stream DiTs (Chroma, AuraFlow, Flux2) join them in."""
    if e0 is not None and e0.dim() == h0.dim() == h.dim() and e0.shape[0] == h0.shape[0]:
        joined = torch.cat([e0, h0], dim=1)
        if joined.shape == h.shape:
            return joined
    raise UnsupportedPipelineError(
        f"block cache: the middle blocks take hidden states of shape {tuple(h0.shape)} and "
        f"{type(block).__name__} returns {tuple(h.shape)}, which is not the text and image streams joined "
        f"(text {None if e0 is None else tuple(e0.shape)} first); choose front/back blocks so that the middle "
        f"keeps one layout, or use TaylorSeer"
    )


def _install(
    plugin: Plugin, s: _Settings, d: Denoiser, adapter: PipelineAdapter, tracker: CallTracker
) -> HookedCache:
    n = len(d.blocks)
    if s.front + s.back >= n:
        raise ValueError(
            f"{type(plugin).__name__}: front/probe blocks ({s.front}) + back blocks ({s.back}) must leave at "
            f"least one middle block, but {type(d.module).__name__} has {n} cacheable blocks "
            f"({', '.join(d.block_names[:4])}{', ...' if n > 4 else ''})"
        )
    unet = adapter.kind == "unet"
    ios = [None if unet else d.block_io(b) for b in d.blocks]  # may refuse: before anything is hooked
    hooks = HookSet(HOOK_NAME, d.module)
    # the block cache decides per step inside the forward: the clock starts every step as "full"
    clock = StepClock(tracker, lambda st, step, n_steps: True, s.check_finite, name=type(plugin).__name__)
    hooks.add(d.module, clock)
    core = _Core(s, clock, unet)
    for i in range(s.front):
        hooks.add(d.blocks[i], FrontBlockHook(core, ios[i], first=i == 0, last=i == s.front - 1))
    middle = range(s.front, n - s.back)
    for i in middle:
        hooks.add(d.blocks[i], MiddleBlockHook(core, ios[i], i, first=i == middle[0], last=i == middle[-1]))
    skipped = sum(p.numel() for i in middle for p in d.blocks[i].parameters())
    roles = {
        "computed every step (front)": d.blocks[: s.front],
        "reused on cached steps (middle)": [d.blocks[i] for i in middle],
        "computed every step (back)": d.blocks[n - s.back :],
    }
    return HookedCache(plugin, d, hooks, clock, skipped, roles)
