"""Runtime-adaptive whole-call caching (EasyCache, Zhou et al. 2025), with a Taylor forecast.

One hook on the denoiser, none on its blocks: a cached step skips the whole network (embedders,
every block, the output head) and answers with a forecast of its output. Whether a step may be
cached is decided from the denoiser's *input* alone, before anything runs, with no calibration run:

- on two consecutive full steps a and b the denoiser's *transformation rate* is measured,

      k = mean|o_b - o_a| / mean|x_b - x_a|        (x: the latent input, o: the output)

- on each later step s the output change is predicted from the input change alone and accumulated,

      E += k * mean|x_s - x_{s-1}| / mean|o_b|

  and the step is cached while E < ``threshold`` (the paper's tau); a full step resets E to 0 and
  measures k again. The first ``warmup`` steps (R) and the last ``final_full_steps`` are full.

A cached step returns the last full output forecast to step s by a Taylor expansion of order
``order`` in the step index (0: the last output as is; 1: the straight line through the last two
full outputs). The paper adds the last full step's output-minus-input residual to the live input
instead, which needs outputs shaped like inputs (not so for PixArt's learned sigma or Z-Image's
lists); forecasting the output works for every family. That variant was not measured here. On the
Flux reference model's tuning prompts order 1 kept more fidelity at small thresholds (45.5 against
45.0 dB at 0.05) and order 0 on long runs of cached steps (42.9 against 37.6 dB at 0.2), which is
why ``safe`` uses 1 and ``fast``/``turbo`` 0 (``benchmarks/results/front-scout/scout1.csv``).

Cost per step: one reduction of the input difference and one host sync for the decision; nothing
inside the network is hooked, which is what makes it cheap on small models (wall speedup close to
the share of calls it skips).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, ClassVar

import torch
from diffusers.hooks.hooks import BaseState

from ..plugins.adapters import Denoiser, PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import Installed, Plugin, PluginKind, check_bools, check_float, check_int, install_each
from ..plugins.pytree import flatten
from ..plugins.runtime import BranchStates, CallTracker, ClockState, HookSet, StepClock, _all_finite, compiled_around
from .taylor import TaylorFactors
from .taylorseer import HookedCache

logger = logging.getLogger("diffboost")

HOOK_NAME = "diffboost.easycache"
#: the name of the latent input of a denoiser's forward (its first parameter)
INPUT_NAMES = ("hidden_states", "sample", "x", "latents")


@dataclasses.dataclass(frozen=True)
class EasyCache(Plugin):
    """Cache whole denoiser calls while the input-predicted output change stays small.

    Args:
        threshold: tau, the accumulated relative output change up to which steps are cached
            (>= 0; 0 never caches). Default 0.04 (the ``safe`` preset). Larger is faster and less
            faithful.
        warmup: R, the first steps always computed (>= 2: two full steps measure k). Default 4.
        final_full_steps: the last steps always computed (>= 0). Default 1.
        max_consecutive_skips: the most steps cached in a row (>= 1). Default 4.
        order: Taylor order of the output forecast on a cached step (0: reuse the last output;
            1: extrapolate from the last two full outputs). Default 1.
        check_finite: compute a cached step in full when its forecast has NaN/Inf (logged once).
            Default True.
    """

    kind: ClassVar[PluginKind] = PluginKind.CACHE
    strength: ClassVar[str | None] = "threshold"

    threshold: float = 0.04
    warmup: int = 4
    final_full_steps: int = 1
    max_consecutive_skips: int = 4
    order: int = 1
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_bools(self)
        check_float(self, "threshold", 0.0, 1e6)
        check_int(self, "warmup", 2, 10_000)
        check_int(self, "final_full_steps", 0, 10_000)
        check_int(self, "max_consecutive_skips", 1, 10_000)
        check_int(self, "order", 0, 2)

    def never_skips(self) -> bool:
        return self.threshold == 0

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        for d in adapter:  # refuse before anything is hooked
            _input_name(d)
        return install_each(adapter, lambda d: _install_one(self, d, tracker))


def _install_one(cfg: EasyCache, d: Denoiser, tracker: CallTracker) -> HookedCache:
    hooks = HookSet(HOOK_NAME, d.module)
    clock = CallCacheClock(tracker, cfg, _input_name(d))
    hooks.add(d.module, clock)
    return HookedCache(cfg, d, hooks, clock, sum(p.numel() for p in d.module.parameters()),
                       {"cached whole": [d.module]})


def _input_name(d: Denoiser) -> str:
    """The denoiser's latent input parameter (its first), or a clear refusal."""
    params = [p for p in inspect.signature(d.module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if params and params[0].name in INPUT_NAMES:
        return params[0].name
    raise UnsupportedPipelineError(
        f"EasyCache reads the denoiser's latent input, the first parameter of forward() (one of "
        f"{INPUT_NAMES}); {type(d.module).__name__}.forward starts with "
        f"{params[0].name if params else 'no positional parameter'!r}. Use ErrorControlledCache or TaylorSeer"
    )


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().abs().mean()


def _parts(x: Any) -> list[torch.Tensor] | None:
    """The latent input as tensors: one tensor, or a list of per-sample tensors (Z-Image)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    return None


def _change_t(a: list[torch.Tensor], b: list[torch.Tensor] | None) -> torch.Tensor | None:
    """mean|a - b| averaged over the parts, on the device (None when the layouts differ: a new
    resolution or batch)."""
    if b is None or not a or len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b)):
        return None
    return torch.stack([_mean_abs(p - q) for p, q in zip(a, b)]).mean()


def _change(a: list[torch.Tensor], b: list[torch.Tensor] | None) -> float | None:
    """:func:`_change_t` as a number (one host sync)."""
    change = _change_t(a, b)
    return None if change is None else float(change)


class _Criterion(BaseState):
    """Per CFG pass: the transformation rate, the accumulated error and the last full step."""

    def __init__(self, order: int):
        self.order = order
        self.reset()

    def reset(self) -> None:
        self.factors = TaylorFactors(self.order)
        self.prev_x: list[torch.Tensor] | None = None  # the input of the previous step (any kind)
        self.full_x: list[torch.Tensor] | None = None  # the input and first output of the last full step
        self.full_o: torch.Tensor | None = None
        self.scale = 0.0  # mean|o| of the last full step
        self.k: float | None = None
        self.error = 0.0


@compiled_around("new_forward")
class CallCacheClock(StepClock):
    """The step clock that decides from the input and forecasts the whole output on cached steps."""

    def __init__(self, tracker: CallTracker, cfg: EasyCache, input_name: str):
        super().__init__(tracker, self._policy, cfg.check_finite, name="EasyCache")
        self.cfg = cfg
        self.input_name = input_name
        self.criteria = BranchStates(_Criterion, init_args=(cfg.order,))
        self._x: list[torch.Tensor] = []

    def _policy(self, st: ClockState, step: int, steps_left: int | None) -> bool:
        cfg, c, x = self.cfg, self.criteria.get_state(), self._x
        prev, c.prev_x = c.prev_x, x
        if step < cfg.warmup or (steps_left is not None and steps_left <= cfg.final_full_steps):
            return True
        cached_in_a_row = step - st.last_full - 1
        if c.k is None or cached_in_a_row >= cfg.max_consecutive_skips or c.scale <= 0 or not c.factors.ready:
            return True
        change = _change(x, prev)
        if change is None:
            return True
        c.error += c.k * change / c.scale
        return not c.error < cfg.threshold

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = _parts(args[0] if args else kwargs.get(self.input_name))
        if x is None:  # nothing to decide on: computed (the policy sees no input change)
            self._x = []
            return super().new_forward(module, *args, **kwargs)
        self._x = x
        plan = self.begin()
        c: _Criterion = self.criteria.get_state()
        if not plan.full:
            out = c.factors.forecast(plan.step)
            if not self.check_finite or _all_finite(out):
                self.end(False)
                return out
            if not self._warned:
                logger.warning("EasyCache: the forecast of step %d has NaN/Inf; computing it in full "
                               "(reported once per pipeline)", plan.step)
                self._warned = True
            self.state.get_state().fallbacks += 1
            plan.full, plan.forced = True, True
        out = self.fn_ref.original_forward(*args, **kwargs)
        self._measure(c, x, out, plan.step)
        self.end(True)
        return out

    def _measure(self, c: _Criterion, x: list[torch.Tensor], out: Any, step: int) -> None:
        """A full step: record the output, measure k against the last full step, reset E (one host
        sync for the three reductions)."""
        leaves, _ = flatten(out)
        o = next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), None)
        c.factors.update(out, step)
        c.error = 0.0
        if o is None:
            return
        dx = _change_t(x, c.full_x)
        if dx is not None and c.full_o is not None and c.full_o.shape == o.shape:
            dx, do, scale = torch.stack([dx, _mean_abs(o - c.full_o), _mean_abs(o)]).tolist()
            c.k = do / dx if dx > 0 else None
        else:
            scale = float(_mean_abs(o))
        c.full_x, c.full_o = x, o.detach()
        c.scale = scale

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.criteria.reset()
        self._x = []
        return super().reset_state(module)
