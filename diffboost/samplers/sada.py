"""SADA: stability-guided adaptive step skipping, working through the scheduler.

Paper: "SADA: Stability-guided Adaptive Diffusion Acceleration". This module is the step-wise part;
the token-wise part for UNet transformer blocks is the ``token_sparsity`` option, implemented in
:mod:`diffboost.samplers.sada_tokens`. The pipeline keeps its own denoising loop; SADA adds two things:

1. a wrapper around the scheduler *instance's* ``step`` (never the class) that observes the solver
   trajectory, decides whether the *next* step is skipped and, on a skipped step, hands the original
   ``step`` an approximated model output. The scheduler therefore runs every step itself and its
   ``step_index`` and multistep history (DPM++ ``model_outputs``) stay consistent;
2. a denoiser-level hook that, on a skipped step, returns a stand-in (the branch's last real output)
   instead of running the denoiser. The stand-in is never used: ``step`` replaces it. Under CFG the
   doubled batch is skipped as a whole, and the ``cond`` / ``uncond`` calls of one step are skipped
   together (the decision is per solver step, not per call).

Coordinates. Every supported solver is read in one normalised form: a state ``y`` and a noise level
``s`` (paper: sigma) with ``y = x0 + s * f`` along the probability-flow ODE ``dy/ds = f``:

- flow matching (Flux, SD3; ``FlowMatchEulerDiscreteScheduler``, flow-sigma DPM-Solver): ``y`` is the
  latent, ``s`` the flow sigma and ``f`` the predicted velocity (``x0 = y - s * v``);
- eps / v / sample prediction (SD 1.x/2.x, SDXL; Euler, DPM++ multistep, DDIM): ``y = x_t / alpha_t``
  is the VP state divided by its signal scale, ``s = sigma_t / alpha_t`` and ``f`` is the predicted
  noise eps (Karras' form of the VP ODE); Euler keeps its latent in these coordinates already.

Stability criterion, evaluated after every step n on the last three drifts of the solved trajectory
(``f_n``, ``f_{n-1}``, ``f_{n-2}``), averaged over all elements (the whole batch decides together):

- flow matching:  ``m = -(f_n - 2 f_{n-1} + f_{n-2})``  (a second difference);
- eps solvers:    ``m = (y_{n-1} - y_hat_{n-1}) * (g_n - 2 g_{n-1} + g_{n-2})`` where ``g = -f`` is the
  drift along the sampling direction (``dy/d(-s)``, time running from noise to data as in the
  paper), so ``m <= 0`` means the drift's change is slowing down; with the Adams-type
  multistep estimate ``y_hat_{n-1} = y_n - (s_n - s_{n-1}) (5/8 f_n + 3/4 f_{n-1} - 3/8 f_{n-2})``
  (our reading of the paper: rebuild the previous state from the newest state and the three latest
  drifts, and compare it with the state the solver actually produced).

(``criterion="curvature"``, ours, replaces this sign test by an error bound: see ``SADA`` and
``_kappa``.) Step n+1 is skipped when ``mean(m) <= 0``, n+1 lies in ``acc_range`` and fewer than
``max_consecutive_skips`` steps were skipped in a row. The skipped step's drift enters the trajectory, so right
after a skip the second difference of a linear extrapolation is zero (m = 0, "stable") and a run of
skips continues until ``max_consecutive_skips``; the next real step then re-tests the trajectory.

Approximations on a skipped step k = n+1 (state ``y_k`` from the solver):

- flow matching: the extrapolated velocity ``f_hat = 2 f_n - f_{n-1}``;
- eps solvers: the cached eps ``f_n`` with x0 from the multistep estimate:
  ``y_hat_k = y_n + (s_k - s_n) (5/8 f_hat + 3/4 f_n - 3/8 f_{n-1})``, ``x0_hat = y_hat_k - s_k f_n``;
- Lagrange mode (both): from step ``lagrange_step`` on, x0 is interpolated instead through the last
  ``lagrange_term`` x0 anchors (kept from real steps, at least ``lagrange_int`` steps apart) with
  Lagrange polynomials in the step index.

The approximation is converted back into the scheduler's own ``prediction_type`` and passed to its
``step``. State (trajectory, anchors, statistics) resets at every pipeline call (the call tracker's
``set_timesteps`` signal); statistics of the last call stay readable through ``diffboost.describe``.

Stacking: SADA's hook is the outermost on the denoiser, so a cache (TaylorSeer, ...) only sees the
denoiser calls that happen; a SADA-skipped step is counted by SADA alone (see
:mod:`diffboost.plugins.stacking`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

from ..plugins.adapters import Denoiser, PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import CallStats, Installed, Plugin, PluginKind, check_bools, check_choice, check_float, check_int, renamed_fields
from ..plugins.runtime import BranchStates, CallTracker, HookSet, InstanceWrap, compiled_around
from .sada_tokens import TokenSparsity, install_tokens

HOOK_NAME = "diffboost.sada"

#: Adams-type weights of the multistep estimate (newest drift first)
ADAMS = (5 / 8, 3 / 4, -3 / 8)

SUPPORTED_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
)


# ----------------------------------------------------------------------------------------------
# the plugin config
# ----------------------------------------------------------------------------------------------


@renamed_fields(max_interval="max_consecutive_skips")
@dataclasses.dataclass(frozen=True)
class SADA(Plugin):
    """Stability-guided adaptive step skipping (step-wise SADA).

    Args:
        acc_range: ``(start, end)``, the acceleration range in step indices (0-based, end
            exclusive): only steps ``start <= k < end`` may be skipped. The criterion needs three
            drifts, so the first step that can be skipped is step 3. ``start == end`` never skips
            (bit-identical to the unpatched pipeline). Default ``(10, 47)`` (paper, 50 steps).
        max_consecutive_skips: the most steps skipped in a row (>= 1). Default 4 (paper).
        lagrange_int: minimum distance in steps between two x0 anchors (>= 1). Default 4 (paper).
        lagrange_term: number of anchors in the Lagrange interpolation (0 = Lagrange mode off,
            otherwise 2-8). Default 4 (paper, SD-2; the paper uses 3 on Flux).
        lagrange_step: first step at which skipped steps use the Lagrange x0 interpolation
            (>= 0). Default 24 (paper, SD-2; 20 on Flux).
        schedule: ablation only: skip exactly these step indices (when the trajectory has three
            drifts), ignoring the criterion and ``max_consecutive_skips``; same approximations. Default None.
        token_sparsity: token-wise SADA on the UNet's transformer blocks (SD/SDXL only): inside
            ``acc_range``, between full refreshes every ``max_consecutive_skips`` steps, blocks compute the
            unstable tokens (per-token m >= 0) and one token per ``sy x sx`` window, the others take
            their cached outputs (see :mod:`diffboost.samplers.sada_tokens`). Default False.
        sx, sy: window width / height in tokens for token sparsity (1-64, sx * sy >= 2). Default
            3 x 3 (paper).
        token_max_downsample: token sparsity acts on blocks whose grid is downsampled at most this
            much relative to the latent, one of 1, 2, 4, 8. Default 1 (highest-resolution blocks).
        criterion: the skip rule. ``"sign"`` (default, paper): skip when the channel mean of m is
            <= 0. ``"curvature"`` (ours): kappa, the relative state error the skip approximation
            would have caused on the last real step n (worst sample of the batch):
            ``|s_n - s_{n-1}| * ||f_hat_n - f_n|| / ||x0_n||``, where f_hat_n is the drift the
            approximation implies (flow matching: f_n - f_hat_n is the second difference
            f_n - 2 f_{n-1} + f_{n-2}; eps solvers: a back-test of the cached-eps / multistep
            estimate), bounds the i-th step skipped in a row: skip while
            ``kappa * i (i + 1) / 2 <= tolerance`` (the error of a linear extrapolation i steps ahead
            under a constant second difference). kappa predicts the next step's error
            (benchmarks/RESULTS.md, "What predicts a safe skip?"); the sign does not.
        tolerance: the bound on kappa * i (i + 1) / 2 for ``criterion="curvature"`` (> 0, a relative
            state error, dimensionless). Default 0.01. On the SD reference model with DPM++ at 28
            steps, 0.5 skips 18.6 steps at 46.4 dB where fixed schedules with as many skips keep
            41.6 / 37.3 dB (benchmarks/RESULTS.md, "SADA").
    """

    kind: ClassVar[PluginKind] = PluginKind.STEP
    strength: ClassVar[str | None] = "tolerance"

    acc_range: tuple[int, int] = (10, 47)
    max_consecutive_skips: int = 4
    lagrange_int: int = 4
    lagrange_term: int = 4
    lagrange_step: int = 24
    schedule: tuple[int, ...] | None = None
    token_sparsity: bool = False
    sx: int = 3
    sy: int = 3
    token_max_downsample: int = 1
    criterion: str = "sign"
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        check_bools(self)
        rng = self.acc_range
        if not isinstance(rng, (tuple, list)) or len(rng) != 2:
            raise TypeError(f"SADA.acc_range must be a (start, end) pair of step indices, got {rng!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in rng):
            raise TypeError(f"SADA.acc_range must hold two ints, got {rng!r}")
        if not 0 <= rng[0] <= rng[1]:
            raise ValueError(f"SADA.acc_range={tuple(rng)} is invalid; need 0 <= start <= end (end exclusive)")
        object.__setattr__(self, "acc_range", (int(rng[0]), int(rng[1])))
        check_int(self, "max_consecutive_skips", 1, 10_000)
        check_int(self, "lagrange_int", 1, 10_000)
        check_int(self, "lagrange_term", 0, 8)
        if self.lagrange_term == 1:
            raise ValueError("SADA.lagrange_term=1 is invalid; allowed: 0 (off) or 2-8 anchors")
        check_int(self, "lagrange_step", 0, 100_000)
        if self.schedule is not None:
            steps = tuple(self.schedule)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in steps):
                raise ValueError(f"SADA.schedule must be non-negative step indices, got {self.schedule!r}")
            object.__setattr__(self, "schedule", tuple(sorted(set(steps))))
        check_int(self, "sx", 1, 64)
        check_int(self, "sy", 1, 64)
        if self.sx * self.sy < 2:
            raise ValueError(
                f"SADA.sx * SADA.sy = {self.sx * self.sy}: a token window must hold at least two tokens "
                "(a 1 x 1 window keeps every token); allowed: sx * sy >= 2"
            )
        check_choice(self, "token_max_downsample", (1, 2, 4, 8))
        check_choice(self, "criterion", ("sign", "curvature"))
        check_float(self, "tolerance", 0.0, 10.0, lo_open=True)

    def tunable_field(self) -> str | None:
        """``tolerance`` with the curvature criterion; the sign criterion has no knob to tune."""
        return "tolerance" if self.criterion == "curvature" and self.schedule is None else None

    def never_skips(self) -> bool:
        if self.token_sparsity and self.acc_range[0] < self.acc_range[1] and self.max_consecutive_skips > 1:
            return False
        if self.schedule is not None:
            return not self.schedule
        return self.acc_range[0] == self.acc_range[1]

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        runtime = SADARuntime(self, adapter, tracker)
        try:
            for d in adapter:
                hooks = HookSet(HOOK_NAME, d.module)
                runtime.hooks.append(hooks)
                hooks.add(d.module, SkipHook(runtime, d))
            if self.token_sparsity:
                runtime.tokens = install_tokens(runtime, adapter)
        except BaseException:
            runtime.remove()
            raise
        return [runtime]


# ----------------------------------------------------------------------------------------------
# reading a solver step in normalised coordinates y = x0 + s * f
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Coords:
    """One step of one solver: converts between the scheduler's latent / model output and (y, s, x0).

    ``kind``: ``"flow"`` (y = latent, s = flow sigma, model output = velocity), ``"ve"`` (Euler:
    y = latent, s = sigma) or ``"vp"`` (DPM-Solver, DDIM: y = latent / alpha_t, s = sigma_t / alpha_t).
    """

    kind: str
    s: float  # noise level in normalised coordinates (paper: sigma_n)
    alpha: float = 1.0  # VP signal scale alpha_t (ve, vp)
    sigma_t: float = 0.0  # VP noise scale sigma_t (ve, vp)
    prediction: str = "epsilon"

    def y(self, sample: torch.Tensor) -> torch.Tensor:
        return sample.float() / self.alpha if self.kind == "vp" else sample.float()

    def _x_vp(self, sample: torch.Tensor) -> torch.Tensor:
        # the VP latent x_t = alpha_t * y
        return sample.float() if self.kind == "vp" else sample.float() * self.alpha

    def x0(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        m = model_output.float()
        if self.kind == "flow":
            return sample.float() - self.s * m  # x0 = x - sigma * v
        x = self._x_vp(sample)
        if self.prediction == "epsilon":
            return (x - self.sigma_t * m) / self.alpha
        if self.prediction == "v_prediction":
            return self.alpha * x - self.sigma_t * m
        return m  # "sample"

    def model_output(self, x0: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model output (in the scheduler's prediction type) whose x0 is ``x0``."""
        if self.kind == "flow":
            return (sample.float() - x0) / self.s
        x = self._x_vp(sample)
        if self.prediction == "epsilon":
            return (x - self.alpha * x0) / self.sigma_t
        if self.prediction == "v_prediction":
            return (self.alpha * x - x0) / self.sigma_t
        return x0


def _prediction(scheduler: Any) -> str:
    return str(getattr(scheduler.config, "prediction_type", "epsilon"))


def check_scheduler(scheduler: Any) -> None:
    """Raise a clear error for a scheduler SADA cannot read."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise UnsupportedPipelineError(
            f"SADA does not support the scheduler {name}; supported: {', '.join(SUPPORTED_SCHEDULERS)} "
            "(swap it with pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config))"
        )
    pred = _prediction(scheduler)
    flow = name == "FlowMatchEulerDiscreteScheduler" or pred == "flow_prediction"
    if not flow and pred not in ("epsilon", "v_prediction", "sample"):
        raise UnsupportedPipelineError(f"SADA does not support {name} with prediction_type={pred!r}")
    if name == "EulerDiscreteScheduler" and float(getattr(scheduler.config, "s_churn", 0.0) or 0.0) > 0:
        raise UnsupportedPipelineError("SADA needs a deterministic Euler scheduler (s_churn = 0)")
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise UnsupportedPipelineError(f"SADA needs a deterministic {name} (stochastic_sampling=False)")


def _float(v: Any) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def read_step(scheduler: Any, timestep: Any) -> Coords:
    """The coordinates of the scheduler's current step (initialising its step index as ``step`` would)."""
    name = type(scheduler).__name__
    pred = _prediction(scheduler)
    if name == "DDIMScheduler":
        t = int(_float(timestep))
        # zero-terminal-SNR schedules end at alpha_bar = 0: clamp as diffusers' Euler / DPM++ do
        # (2**-24), so y = x / alpha stays finite (SADA only reads the first steps, never skips them)
        abar = max(_float(scheduler.alphas_cumprod[t]), 2.0**-24)
        alpha, sigma_t = abar**0.5, (1.0 - abar) ** 0.5
        return Coords("vp", sigma_t / alpha, alpha, sigma_t, pred)
    index = getattr(scheduler, "step_index", None)
    if index is None:  # before the scheduler's first step: where that step will start, without touching it
        begin = getattr(scheduler, "begin_index", None)
        index = begin if begin is not None else scheduler.index_for_timestep(timestep)
    sigma = _float(scheduler.sigmas[index])
    if name == "FlowMatchEulerDiscreteScheduler" or pred == "flow_prediction":
        return Coords("flow", sigma, prediction=pred)
    alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
    if name == "EulerDiscreteScheduler":
        return Coords("ve", sigma, alpha, sigma * alpha, pred)
    return Coords("vp", sigma, alpha, sigma * alpha, pred)  # DPM-Solver: sigmas are VE sigmas


# ----------------------------------------------------------------------------------------------
# per-call state and the decision
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    """One solved step: state y_n, noise level s_n, drift f_n (real or approximated)."""

    step: int
    y: torch.Tensor
    s: float
    f: torch.Tensor
    real: bool = True  # False: the drift is SADA's approximation of a skipped step


class CallState:
    """Everything SADA remembers within one pipeline call."""

    def __init__(self) -> None:
        self.step = 0  # index of the next solver step
        self.trajectory: list[Point] = []  # the last three solved steps
        self.anchors: list[tuple[int, torch.Tensor]] = []  # (step, x0) of real steps
        self.skip_current = False  # is the step about to run skipped?
        self.in_a_row = 0  # consecutive skipped steps so far
        self.skipped: list[int] = []
        self.lagrange_steps: list[int] = []
        self.saved_calls = 0  # denoiser calls replaced by a stand-in
        self.saved_per_pass: dict[str, int] = {}  # the same, per CFG pass
        self.last_m: float | None = None
        self.kappa: float | None = None  # curvature criterion: kappa of the last real triple (_kappa)
        # token sparsity: the stability map (H, W) after the last solved step, the plan of the
        # step about to run, the last step computed with all tokens
        self.token_map: torch.Tensor | None = None
        self.real_token_map: torch.Tensor | None = None  # the last map computed from a real newest drift
        self.token_pruned = False
        self.last_token_full = -1
        self.token_pruned_steps: list[int] = []


class SADARuntime(Installed):
    """Installed SADA: the scheduler-step wrapper, the denoiser hooks and the per-call state."""

    def __init__(self, cfg: SADA, adapter: PipelineAdapter, tracker: CallTracker):
        self.cfg = cfg
        self.adapter = adapter
        self.tracker = tracker
        # a sampler that integrates steps itself (bottleneck sampling) hands them to SADA through the
        # runtime, without looking for it among the installed plugins
        tracker.step_solver = self
        self.pipe = adapter.pipe
        self.hooks: list[HookSet] = []  # one per denoiser
        self.state = CallState()
        self.last_stats: dict[str, Any] = {}
        self.scheduler: Any = None
        self._step_patch: InstanceWrap | None = None
        self.tokens: TokenSparsity | None = None
        self._wrap(getattr(self.pipe, "scheduler", None))

    # --- the scheduler wrapper ------------------------------------------------------------------

    def _wrap(self, scheduler: Any) -> None:
        check_scheduler(scheduler)
        self.scheduler = scheduler
        self._step_patch = InstanceWrap(
            scheduler, "step", lambda original: lambda *args, **kwargs: self._step(original, args, kwargs)
        )

    def _unwrap(self) -> None:
        if self.scheduler is None:
            return
        self._step_patch.restore()
        self.scheduler = None

    def follow_scheduler(self) -> None:
        """Follow ``pipe.scheduler = X.from_config(...)`` done after ``apply``."""
        current = getattr(self.pipe, "scheduler", None)
        if current is not self.scheduler:
            self._unwrap()
            self._wrap(current)
            self.reset()

    def _step(self, original: Any, args: tuple, kwargs: dict) -> Any:
        args = list(args)
        names = ("model_output", "timestep", "sample")
        get = {n: (args[i] if i < len(args) else kwargs[n]) for i, n in enumerate(names)}
        model_output, timestep, sample = get["model_output"], get["timestep"], get["sample"]
        n = self.state.step
        c = read_step(self.scheduler, timestep)
        used = self._observe(n, c, model_output, sample)
        if used is not model_output:
            if len(args) > 0:
                args[0] = used
            else:
                kwargs["model_output"] = used
        out = original(*args, **kwargs)
        self._advance(n)
        return out

    def solve_flow_step(self, step: int, sigma: float, model_output: torch.Tensor, sample: torch.Tensor,
                        integrate: Any) -> Any:
        """One flow-matching step integrated by someone else on its own sigmas (bottleneck stages).

        ``step`` is the pipeline's step index (``acc_range`` and ``max_consecutive_skips`` count in it),
        ``sigma`` the flow sigma of ``sample``. On a skipped step the velocity is replaced by SADA's
        approximation; ``integrate(velocity)`` then advances the state and its result is returned.
        """
        if not self.flow:
            raise RuntimeError("SADA.solve_flow_step needs a flow-matching scheduler")
        self.state.step = step
        used = self._observe(step, Coords("flow", float(sigma)), model_output, sample)
        out = integrate(used)
        self._advance(step)
        return out

    def _observe(self, n: int, c: Coords, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Record solver step n (state ``sample`` at noise level c.s); on a skipped step return the
        approximated model output the solver must use instead of ``model_output``."""
        st = self.state
        y = c.y(sample)
        if st.skip_current and len(st.trajectory) >= 2:
            x0 = self._approximate(st, n, y, c)
            model_output = c.model_output(x0, sample).to(model_output.dtype)
            st.skipped.append(n)
            st.in_a_row += 1
        else:
            x0 = c.x0(model_output, sample)
            st.in_a_row = 0
            if st.token_pruned:
                st.token_pruned_steps.append(n)
            else:
                st.last_token_full = n
            if not st.anchors or n - st.anchors[-1][0] >= self.cfg.lagrange_int:
                st.anchors = (st.anchors + [(n, x0)])[-max(2, self.cfg.lagrange_term) :]
        # the drift the solver uses: f = (y - x0) / s  (for flow matching this is the velocity)
        f = (y - x0) / c.s
        real = not (st.skipped and st.skipped[-1] == n)
        st.trajectory = (st.trajectory + [Point(n, y, c.s, f, real)])[-3:]
        return model_output

    def _advance(self, n: int) -> None:
        """Step n is solved: decide on step n + 1 (and plan its tokens)."""
        st = self.state
        st.step = n + 1
        st.skip_current = self._decide(st, n + 1)
        if self.tokens is not None:
            self._plan_tokens(st, n + 1)

    # --- the criterion and the approximations ---------------------------------------------------

    def _decide(self, st: CallState, k: int) -> bool:
        """Skip step k? Uses the trajectory up to step k-1."""
        cfg = self.cfg
        num = self.tracker.num_steps
        if (num is not None and k >= num) or len(st.trajectory) < 3:
            return False
        if cfg.schedule is not None:
            return k in cfg.schedule
        if cfg.criterion == "curvature" and st.trajectory[-1].real:
            st.kappa = _kappa(st.trajectory, self.flow)
        if not cfg.acc_range[0] <= k < cfg.acc_range[1] or st.in_a_row >= cfg.max_consecutive_skips:
            return False
        if cfg.criterion == "curvature":
            # with a constant second difference, the i-th step skipped in a row (extrapolated from
            # the last two real drifts) is off by i (i + 1) / 2 second differences: bound that.
            # After a skip the newest drift is an extrapolation, so the last real kappa stands.
            i = st.in_a_row + 1
            return st.kappa is not None and st.kappa * i * (i + 1) / 2 <= cfg.tolerance
        st.last_m = float(self._m(st).mean())
        return st.last_m <= 0.0

    def _m(self, st: CallState) -> torch.Tensor:
        """The per-element stability signal m on the last three drifts (m <= 0: stable)."""
        p2, p1, p0 = st.trajectory  # n-2, n-1, n
        second = p0.f - 2 * p1.f + p2.f
        if self.flow:
            return -second
        # multistep estimate of y_{n-1}, rebuilt from y_n and the three latest drifts
        y_hat = p0.y - (p0.s - p1.s) * (ADAMS[0] * p0.f + ADAMS[1] * p1.f + ADAMS[2] * p2.f)
        # the paper's drift points along the sampling direction (d y / d(-s)): its second
        # difference is -second; the state difference y - y_hat does not depend on the sign
        return (p1.y - y_hat) * -second

    def _plan_tokens(self, st: CallState, k: int) -> None:
        """Token plan of step k: pruned (kept tokens only) or a full refresh."""
        cfg = self.cfg
        st.token_map, st.token_pruned = None, False
        if len(st.trajectory) == 3 and st.trajectory[-1].real:
            m = self._m(st)
            if m.ndim == 4:  # (B, C, H, W) latents only
                # per-token channel mean; one token set for the whole batch: unstable in any element
                st.real_token_map = m.mean(dim=1).amax(dim=0)
        # after a skipped step the newest drift is an extrapolation whose second difference is 0 by
        # construction (m = 0 would mark every token unstable): the last real map is used instead
        if st.skip_current or st.real_token_map is None or st.last_token_full < 0:
            return
        if not cfg.acc_range[0] <= k < cfg.acc_range[1] or k - st.last_token_full >= cfg.max_consecutive_skips:
            return
        st.token_map = st.real_token_map
        st.token_pruned = True

    def _approximate(self, st: CallState, k: int, y_k: torch.Tensor, c: Coords) -> torch.Tensor:
        """x0 for the skipped step k at state y_k."""
        cfg = self.cfg
        if cfg.lagrange_term >= 2 and k >= cfg.lagrange_step and len(st.anchors) >= 2:
            st.lagrange_steps.append(k)
            return lagrange(st.anchors[-cfg.lagrange_term :], k)
        return extrapolated_x0(st.trajectory[-2], st.trajectory[-1], y_k, c.s, self.flow)

    @property
    def flow(self) -> bool:
        return read_kind(self.scheduler) == "flow"

    # --- Installed ------------------------------------------------------------------------------

    def reset(self) -> None:
        if self.state.step:
            self.last_stats = self._call_stats()
        self.state = CallState()
        if self.tokens is not None:
            self.tokens.reset()

    def remove(self) -> None:
        if self.tracker.step_solver is self:
            self.tracker.step_solver = None
        for hooks in reversed(self.hooks):
            hooks.remove()
        self.hooks.clear()
        if self.tokens is not None:
            self.tokens.remove()
            self.tokens = None
        self._unwrap()

    def _call_stats(self) -> dict[str, Any]:
        st = self.state
        out = {
            "steps": st.step,
            "skipped": len(st.skipped),
            "skipped_steps": list(st.skipped),
            "lagrange_steps": list(st.lagrange_steps),
            "denoiser_calls_saved": st.saved_calls,
            "saved_per_pass": dict(st.saved_per_pass),
        }
        if self.tokens is not None:
            out["token_pruned_steps"] = list(st.token_pruned_steps)
            out.update(self.tokens.stats())
        return out

    def call_stats(self) -> CallStats:
        details = self.stats()
        return CallStats(details["plugin"], dict(details.get("saved_per_pass", {})),
                         tuple(details.get("skipped_steps", ())), details)

    def stats(self) -> dict[str, Any]:
        current = self._call_stats() if self.state.step else dict(self.last_stats)
        return {
            "plugin": repr(self.cfg),
            "mode": "flow" if self.scheduler is not None and self.flow else "eps",
            "scheduler": type(self.scheduler).__name__,
            **(current or self._call_stats()),
        }


def extrapolated_x0(p1: Point, p0: Point, y_k: torch.Tensor, s_k: float, flow: bool) -> torch.Tensor:
    """x0 (in y coordinates) for a skipped step at state ``y_k``, noise level ``s_k``, from the last
    two solved steps ``p1`` (n-1) and ``p0`` (n)."""
    f_hat = 2 * p0.f - p1.f  # linear extrapolation of the drift
    if flow:
        return y_k - s_k * f_hat
    # eps solvers: cached eps f_n with x0 from the multistep estimate of the state
    y_hat = p0.y + (s_k - p0.s) * (ADAMS[0] * f_hat + ADAMS[1] * p0.f + ADAMS[2] * p1.f)
    return y_hat - s_k * p0.f


def _kappa(trajectory: list[Point], flow: bool) -> float:
    """kappa: the state error the skip approximation would have caused on the newest step n,
    ``|s_n - s_{n-1}| * ||f_hat_n - f_n|| / ||x0_n||`` with f_hat_n = (y_n - x0_hat_n) / s_n the drift
    the approximation implies, of the worst batch element.

    A drift error df on a step of size ds moves the state by ds * df, and that displacement reaches
    the final image (y = x0 at s = 0) nearly unchanged; ||x0_n|| makes it relative. For flow matching
    f_hat_n - f_n = -(f_n - 2 f_{n-1} + f_{n-2}) (the second difference); for eps solvers this
    back-tests the cached-eps / multistep estimate, whose eps error matters in proportion to the
    (large, early) step in s.
    """
    p2, p1, p0 = trajectory
    if flow:
        err = p0.f - 2 * p1.f + p2.f
    else:
        err = (p0.y - extrapolated_x0(p2, p1, p0.y, p0.s, flow)) / p0.s - p0.f
    x0 = (p0.y - p0.s * p0.f).flatten(1).float()
    step = abs(p0.s - p1.s)
    return float((step * err.flatten(1).float().norm(dim=1) / x0.norm(dim=1).clamp_min(1e-12)).max())


def read_kind(scheduler: Any) -> str:
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler" or _prediction(scheduler) == "flow_prediction":
        return "flow"
    return "ve" if name == "EulerDiscreteScheduler" else "vp"


def lagrange(anchors: list[tuple[int, torch.Tensor]], k: int) -> torch.Tensor:
    """Lagrange interpolation of x0 at step k through the anchors (step_j, x0_j):
    x0_hat = sum_j x0_j * prod_{i != j} (k - step_i) / (step_j - step_i)."""
    out = torch.zeros_like(anchors[0][1])
    for j, (nj, xj) in enumerate(anchors):
        w = 1.0
        for i, (ni, _) in enumerate(anchors):
            if i != j:
                w *= (k - ni) / (nj - ni)
        out = out + w * xj
    return out


# ----------------------------------------------------------------------------------------------
# the denoiser hook
# ----------------------------------------------------------------------------------------------


class _LastOutput(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.output: Any = None


@compiled_around("new_forward")
class SkipHook(ModelHook):
    """On a skipped step, return the branch's last real output instead of running the denoiser."""

    _is_stateful = True  # to receive the cond/uncond cache context

    def __init__(self, runtime: SADARuntime, denoiser: Denoiser):
        super().__init__()
        self.runtime = runtime
        self.denoiser = denoiser
        self.last = BranchStates(_LastOutput)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        rt.tracker.ensure_current()
        rt.follow_scheduler()
        st: _LastOutput = self.last.get_state()
        skip = rt.state.skip_current and st.output is not None
        rt.tracker.skip_decided("SADA", self.last.branch, rt.state.step, not skip)
        if skip:
            rt.state.saved_calls += 1
            per_pass = rt.state.saved_per_pass
            per_pass[self.last.branch] = per_pass.get(self.last.branch, 0) + 1
            return st.output  # a stand-in: the wrapped scheduler step replaces it
        out = self.fn_ref.original_forward(*args, **kwargs)
        st.output = out
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers resets stateful hooks at the end of every call; statistics live in the runtime
        self.last.reset()
        return module
