"""Bottleneck Sampling: denoise high -> low -> high resolution, training-free.

Paper: "Training-free Diffusion Acceleration with Bottleneck Sampling" (Tian et al., 2025). The first
steps fix the layout at full resolution, the middle steps run at a lower resolution (attention cost
falls with the square of the token count), the last steps restore detail at full resolution.

How it sits on a pipeline (no class is patched, no pipeline code is copied; the pipeline keeps its
own loop of ``num_inference_steps`` iterations):

- the scheduler *instance's* ``step`` is wrapped: it integrates each stage on the stage's own sigmas
  and, on the last step of a stage, jumps to the next stage (x0 estimate, resize, re-noise), so the
  latents it returns have the stage's size;
- a pre-forward hook on the denoiser replaces what depends on the stage: the timestep, and for Flux
  the token positions ``img_ids`` (SD3, Wan and HunyuanVideo derive positions from the latents'
  shape, so nothing else changes there);
- the first stage uses the pipeline's own scheduler step and schedule unchanged, so a plan of one
  full-resolution stage is bit-identical to the pipeline.

Stage plan (paper symbols in brackets): ``stages = ((scale_1, share_1), ..., (scale_K, share_K))``
[K stages; scale = side-length ratio to the requested size; share = fraction of
``num_inference_steps`` [N] spent in the stage]. With the pipeline's own sigmas S_0 > ... > S_N,
stage k covers the pipeline steps [a_k, a_{k+1}) (n_k = a_{k+1} - a_k >= 1 steps) and:

- starts at sigma_start = S_{a_k} + renoise_k * (1 - S_{a_k}) (k >= 1; stage 0 starts at S_0) and
  ends at sigma_end = S_{a_{k+1}} (S_N, normally 0, for the last stage);
- places its n_k steps on [sigma_end, sigma_start] with the time shift [s_k] applied to the stage's
  normalized time u in [0, 1]: u' = s u / (1 + (s - 1) u) (shift > 1 spends more steps at the
  noisy end of the stage, where resizing artifacts are repaired). Applied to the stage's own
  interval, not to absolute sigma, so the stage boundaries stay where the plan puts them;
- at a switch (the stage's last step, model velocity v at sigma_j): x0 = x - sigma_j * v (flow
  matching: x_t = (1 - t) x0 + t eps, v = eps - x0), resize x0 to the next stage's latent size
  (spatial only; video frames unchanged), then x = (1 - sigma') x0 + sigma' eps' at the next
  stage's start sigma' with fresh noise eps' drawn from a generator seeded by the call's initial
  latents (or ``seed``), so a seeded call is reproducible.

Sizes: a stage's latent side is ``scale * side`` rounded to the nearest multiple of the patch size
(2 latent pixels for Flux's 2x2 packing and SD3/Wan/HunyuanVideo patches, i.e. 16 image pixels with
their /8 VAEs), at least one patch. Any ``height``/``width`` the pipeline accepts works: rounding
only changes the low-resolution stages, the last stage is always the pipeline's exact full size.

Caches (TaylorSeer, block caches) and step plugins stacked with it are reset at every resolution
switch: their stored features have the old token count. Their warmup therefore restarts per stage.
Stages after the first integrate with Euler steps of their own on the stage's sigmas and never call
the scheduler's own ``step``; a stacked SADA therefore sees those steps through
``SADARuntime.solve_flow_step`` (the stage's sigma, the model's velocity, the Euler update): it
records the trajectory, decides skips in the pipeline's step indices and replaces the velocity of a
skipped step, in every stage. At a switch its trajectory resets with the caches (the old drifts have
the old resolution), so each stage needs three real steps before SADA can skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..plugins.adapters import PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import Installed, Plugin, PluginKind, check_bools, check_int
from ..plugins.runtime import CallTracker, HookSet, InstanceWrap, StageSwitched, advance_step_index, compiled_around

HOOK_NAME = "diffboost.bottleneck"

#: families this sampler knows: how their latents are laid out and how the denoiser reads time
#: ("packed": Flux (B, N, 4C) tokens of 2x2 latent patches; "image": (B, C, H, W);
#: "video": (B, C, F, H, W)); timestep scale: Flux takes sigma, the others sigma * 1000.
_LAYOUTS = {"flux": "packed", "sd3": "image", "wan": "video", "hunyuan_video": "video"}
_PATCH = 2  # latent pixels per patch side for all families above


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class BottleneckSampling(Plugin):
    """High-low-high resolution sampling for flow-matching pipelines (Flux, SD3, Wan, HunyuanVideo).

    Args:
        stages: ``((scale, share), ...)``: side-length scale in (0, 1] (1.0 = requested size) and the
            share of ``num_inference_steps`` of each stage (> 0, summing to 1). The first and the last
            stage must have scale 1.0 (the pipeline starts from, and decodes, full-size latents).
            Step counts are the shares times N rounded by largest remainder, each >= 1.
            Default ``((1.0, 0.2), (0.5, 0.6), (1.0, 0.2))``.
        shift: s_k, time shift inside each stage after the first (> 0; 1.0 = steps evenly spaced in
            sigma between the stage's ends). A float applies to every stage after the first; a tuple
            gives one value per stage (the first stage's must be 1.0: it keeps the pipeline's own
            schedule). Default 2.0.
        renoise: how far back towards pure noise each switch goes, as a fraction of the remaining
            distance: sigma_start = S + renoise * (1 - S), in [0, 1). A float for every switch or a
            tuple with one value per switch (``len(stages) - 1``). Default 0.1.
        seed: seed of the re-noising noise; ``None`` derives it from the call's initial latents (a
            seeded generator gives a reproducible call). Default None.
    """

    kind: ClassVar[PluginKind] = PluginKind.SAMPLER

    stages: tuple = ((1.0, 0.2), (0.5, 0.6), (1.0, 0.2))
    shift: Any = 2.0
    renoise: Any = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        check_bools(self)
        for name in ("stages", "shift", "renoise"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        self._check_stages()
        k = len(self.stages)
        shifts = self._per_stage("shift", k)
        if shifts[0] != 1.0:
            raise ValueError(
                f"BottleneckSampling.shift[0]={shifts[0]} must be 1.0: the first stage keeps the pipeline's own schedule"
            )
        for i, s in enumerate(shifts):
            _check_number(f"BottleneckSampling.shift[{i}]", s, lo=0.0, lo_open=True)
        for i, r in enumerate(self._per_stage("renoise", k)[1:]):
            _check_number(f"BottleneckSampling.renoise[{i}]", r, lo=0.0, hi=1.0, hi_open=True)
        if self.seed is not None:
            check_int(self, "seed", 0, 2**63 - 1)

    def _check_stages(self) -> None:
        stages = self.stages
        if not isinstance(stages, tuple) or not stages:
            raise ValueError(f"BottleneckSampling.stages must be a non-empty sequence of (scale, share), got {stages!r}")
        for i, stage in enumerate(stages):
            if not isinstance(stage, tuple) or len(stage) != 2:
                raise ValueError(f"BottleneckSampling.stages[{i}]={stage!r} must be a (scale, share) pair")
            _check_number(f"BottleneckSampling.stages[{i}] scale", stage[0], lo=0.0, hi=1.0, lo_open=True)
            _check_number(f"BottleneckSampling.stages[{i}] share", stage[1], lo=0.0, hi=1.0, lo_open=True)
        if stages[0][0] != 1.0 or stages[-1][0] != 1.0:
            raise ValueError(
                f"BottleneckSampling.stages must start and end at scale 1.0 (full resolution), got scales "
                f"{[s for s, _ in stages]}"
            )
        total = sum(share for _, share in stages)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"BottleneckSampling.stages shares must sum to 1, got {total:g} ({[s for _, s in stages]})")

    def _per_stage(self, field: str, k: int) -> tuple[float, ...]:
        """``shift`` per stage (first 1.0) or ``renoise`` per stage (first unused, 0.0)."""
        value = getattr(self, field)
        if isinstance(value, tuple):
            want = k if field == "shift" else k - 1
            if len(value) != want:
                raise ValueError(f"BottleneckSampling.{field} has {len(value)} values; the plan needs {want}")
            return tuple(value) if field == "shift" else (0.0, *value)
        _check_number(f"BottleneckSampling.{field}", value)
        return (1.0,) + (value,) * (k - 1) if field == "shift" else (0.0,) + (value,) * (k - 1)

    def never_skips(self) -> bool:
        return len(self.stages) == 1

    def step_counts(self, num_steps: int) -> list[int]:
        """Steps per stage for ``num_steps``: shares x N rounded by largest remainder, each >= 1."""
        k = len(self.stages)
        if num_steps < k:
            raise ValueError(f"BottleneckSampling with {k} stages needs num_inference_steps >= {k}, got {num_steps}")
        exact = [share * num_steps for _, share in self.stages]
        counts = [int(math.floor(e)) for e in exact]
        by_remainder = sorted(range(k), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[: num_steps - sum(counts)]:
            counts[i] += 1
        for i in range(k):  # a stage rounded to 0 steps takes one from the longest stage
            if counts[i] == 0:
                counts[max(range(k), key=lambda m: counts[m])] -= 1
                counts[i] = 1
        return counts

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        if adapter.family not in _LAYOUTS or not adapter.is_flow_matching:
            raise UnsupportedPipelineError(
                f"BottleneckSampling supports flow-matching {sorted(_LAYOUTS)} pipelines; got "
                f"{type(adapter.pipe).__name__} (family {adapter.family}, scheduler {type(adapter.scheduler).__name__})"
            )
        if getattr(getattr(adapter.pipe, "config", None), "expand_timesteps", False):
            raise UnsupportedPipelineError(
                "BottleneckSampling does not support Wan pipelines with expand_timesteps=True (per-token timesteps)"
            )
        return [_Bottleneck(self, adapter, tracker)]


def _check_number(where: str, value: Any, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False) -> None:
    """Range check of one number inside a tuple field, with a message naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number, got {type(value).__name__} ({value!r})")
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and (value >= hi if hi_open else value > hi)
    if bad:
        parts = [] if lo is None else [f"{'>' if lo_open else '>='} {lo}"]
        parts += [] if hi is None else [f"{'<' if hi_open else '<='} {hi}"]
        raise ValueError(f"{where}={value} is out of range; allowed: {' and '.join(parts) or 'finite'}")


# ----------------------------------------------------------------------------------------------
# latent layout helpers: everything is resized as a (B, C, H, W) grid of latent pixels
# ----------------------------------------------------------------------------------------------


def unpack_flux(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Flux tokens (B, h*w, C*4) of 2x2 latent patches on an h x w token grid -> (B, C, 2h, 2w)."""
    b, _, d = x.shape
    h, w = grid
    return x.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, 2 * h, 2 * w)


def pack_flux(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latent pixels (H, W even) -> Flux tokens (B, H/2 * W/2, C*4)."""
    b, c, hh, ww = x.shape
    return x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // 2) * (ww // 2), c * 4)


def flux_positions(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux ``img_ids`` (h*w, 3) for an h x w token grid: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def resize_latents(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Spatial resize of (B, C, H, W) or (B, C, F, H, W) latents in float32; frames unchanged.

    Down: antialiased bilinear (averages, no aliasing); up: bicubic (keeps edges sharper)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    video = x.ndim == 5
    if video:
        b, c, f = x.shape[:3]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, *x.shape[-2:])
    down = size[0] * size[1] < x.shape[-2] * x.shape[-1]
    y = F.interpolate(x.float(), size=size, mode="bilinear" if down else "bicubic", align_corners=False, antialias=down)
    if video:
        y = y.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)
    return y.contiguous()


def stage_side(side: int, scale: float) -> int:
    """A stage's latent side: ``scale * side`` rounded to a multiple of the patch size, >= 1 patch."""
    if scale == 1.0:
        return side
    return max(_PATCH, _PATCH * round(side * scale / _PATCH))


def stage_sigmas(start: float, end: float, steps: int, shift: float) -> list[float]:
    """n+1 sigmas from ``start`` to ``end``: u_j = 1 - j/n shifted u' = s u / (1 + (s - 1) u)."""
    out = []
    for j in range(steps + 1):
        u = 1.0 - j / steps
        u = shift * u / (1.0 + (shift - 1.0) * u)
        out.append(end + (start - end) * u)
    return out


# ----------------------------------------------------------------------------------------------
# per-call plan and state
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stage:
    begin: int  # first pipeline step of the stage
    steps: int
    size: tuple[int, int]  # latent pixels (H, W)
    sigmas: list[float]  # steps + 1 values; stage 0: the pipeline's own


class _Bottleneck(Installed):
    """The wrapped scheduler step and the denoiser hooks of one BottleneckSampling install."""

    def __init__(self, cfg: BottleneckSampling, adapter: PipelineAdapter, tracker: CallTracker):
        self.cfg = cfg
        self.adapter = adapter
        self.tracker = tracker
        self.layout = _LAYOUTS[adapter.family]
        self.scheduler = None
        self._wrap_step(adapter.pipe.scheduler)
        self.hooks = []
        try:
            for d in adapter:
                hooks = HookSet(HOOK_NAME, d.module)
                hooks.add(d.module, _StageInputsHook(self))
                self.hooks.append(hooks)
        except BaseException:
            self.remove()
            raise
        self.last_stats: dict[str, Any] = {}
        self.reset()

    # -- scheduler wrapping (instance attribute only; removed exactly as CallTracker does) ----------

    def _wrap_step(self, scheduler: Any) -> None:
        self.scheduler = scheduler

        def make(original: Callable) -> Callable:
            def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                return self.step(original, model_output, timestep, sample, *args, **kwargs)

            return step

        self._step_patch = InstanceWrap(scheduler, "step", make)

    def _unwrap_step(self) -> None:
        if self.scheduler is None:
            return
        self._step_patch.restore()
        self.scheduler = None

    def remove(self) -> None:
        for hooks in self.hooks:
            hooks.remove()
        self.hooks = []
        self._unwrap_step()

    def reset(self) -> None:
        """New call (after the pipeline's set_timesteps): forget the plan, follow a swapped scheduler."""
        if self.stages_taken():
            self.last_stats = self.stats()
        current = getattr(self.adapter.pipe, "scheduler", None)
        if current is not self.scheduler and current is not None:
            self._unwrap_step()
            self._wrap_step(current)
        self.i = 0  # pipeline steps taken in this call
        self.plan: list[_Stage] | None = None
        self.full_size: tuple[int, int] | None = None
        self.noise_seed: int | None = None
        self.denoiser_calls = 0

    def stages_taken(self) -> bool:
        return getattr(self, "plan", None) is not None

    # -- plan ---------------------------------------------------------------------------------------

    def _build_plan(self) -> list[_Stage]:
        sched = self.scheduler
        sigmas = [float(s) for s in sched.sigmas.flatten().tolist()]
        n = len(sigmas) - 1
        counts = self.cfg.step_counts(n)
        shifts = self.cfg._per_stage("shift", len(counts))
        renoise = self.cfg._per_stage("renoise", len(counts))
        plan, begin = [], 0
        for k, ((scale, _), steps) in enumerate(zip(self.cfg.stages, counts)):
            size = (stage_side(self.full_size[0], scale), stage_side(self.full_size[1], scale))
            end = begin + steps
            if k == 0:
                own = sigmas[: end + 1]
            else:
                start = sigmas[begin] + renoise[k] * (1.0 - sigmas[begin])
                own = stage_sigmas(start, sigmas[end], steps, shifts[k])
            plan.append(_Stage(begin, steps, size, own))
            begin = end
        return plan

    def _stage(self) -> tuple[int, _Stage]:
        for k, st in enumerate(self.plan):
            if st.begin <= self.i < st.begin + st.steps:
                return k, st
        raise RuntimeError(
            f"BottleneckSampling: pipeline step {self.i} is past the plan of {sum(s.steps for s in self.plan)} steps"
        )

    def _start(self, hidden: torch.Tensor, img_ids: torch.Tensor | None) -> None:
        """First denoiser call of a call: read the full latent size, build the plan."""
        if self.layout == "packed":
            if img_ids is None:
                raise ValueError("BottleneckSampling: Flux denoiser called without img_ids")
            ids = img_ids[-hidden.shape[1]:] if img_ids.ndim == 2 else img_ids[0]
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            if grid[0] * grid[1] != hidden.shape[1]:
                raise ValueError(
                    f"BottleneckSampling: Flux img_ids describe a {grid} grid but there are {hidden.shape[1]} "
                    "image tokens (extra conditioning tokens are not supported)"
                )
            self.full_size = (2 * grid[0], 2 * grid[1])
        else:
            self.full_size = tuple(hidden.shape[-2:])
        self.plan = self._build_plan()

    # -- denoiser side ------------------------------------------------------------------------------

    def stage_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        hidden = kwargs.get("hidden_states")
        if hidden is None or "timestep" not in kwargs:
            raise ValueError("BottleneckSampling: the denoiser must be called with hidden_states= and timestep=")
        if self.plan is None:
            self._start(hidden, kwargs.get("img_ids"))
        self.denoiser_calls += 1
        k, st = self._stage()
        if k == 0:
            return kwargs  # the pipeline's own inputs, untouched
        sigma = st.sigmas[self.i - st.begin]
        t = sigma if self.layout == "packed" else sigma * self.scheduler.config.get("num_train_timesteps", 1000)
        kwargs = dict(kwargs)
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], t)
        if self.layout == "packed":
            kwargs["img_ids"] = flux_positions((st.size[0] // 2, st.size[1] // 2), hidden.device, kwargs["img_ids"].dtype)
        return kwargs

    # -- scheduler side -----------------------------------------------------------------------------

    def step(self, original: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             *args: Any, **kwargs: Any) -> Any:
        if self.plan is None or len(self.plan) == 1:
            return original(model_output, timestep, sample, *args, **kwargs)
        if self.noise_seed is None:
            self.noise_seed = self.cfg.seed if self.cfg.seed is not None else _seed_from(sample)
        return_dict = kwargs.get("return_dict", True)
        k, st = self._stage()
        j = self.i - st.begin
        last_of_stage = j + 1 == st.steps
        if k == 0 and not last_of_stage:
            self.i += 1
            return original(model_output, timestep, sample, *args, **kwargs)

        sigma = st.sigmas[j]
        switch = last_of_stage and k + 1 < len(self.plan)

        def integrate(v: torch.Tensor) -> torch.Tensor:
            x, v = sample.float(), v.float()
            if not switch:
                return x + (st.sigmas[j + 1] - sigma) * v  # Euler step of the flow ODE
            nxt = self.plan[k + 1]
            x0 = x - sigma * v  # flow matching: x0 = x_t - sigma_t * v
            x0 = self._resize(x0, st.size, nxt.size)
            start = nxt.sigmas[0]
            return (1.0 - start) * x0 + start * self._noise(x0, k)  # re-noise to the next stage's start

        stepper = self._step_plugin()
        if stepper is not None:  # SADA decides, and approximates v on the steps it skips
            x = stepper.solve_flow_step(self.i, sigma, model_output, sample, integrate)
        else:
            x = integrate(model_output)
        if switch:  # the other plugins' stored features are for the old resolution
            self.tracker.emit(StageSwitched(k + 1, tuple(self.plan[k + 1].size), source=self))
        self.tracker.step_done()  # the scheduler's own step did not run: tell the runtime a step ended
        self.i += 1
        advance_step_index(self.scheduler)
        out = x.to(model_output.dtype)
        if not return_dict:
            return (out,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=out)

    def _step_plugin(self) -> Any:
        """A stacked step plugin (SADA) that can follow steps integrated on the stage's sigmas, as the
        runtime knows it."""
        return getattr(self.tracker, "step_solver", None)

    def _resize(self, x: torch.Tensor, size: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
        if self.layout == "packed":
            grid = (size[0] // 2, size[1] // 2)
            return pack_flux(resize_latents(unpack_flux(x, grid), new))
        return resize_latents(x, new)

    def _noise(self, like: torch.Tensor, switch: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed((self.noise_seed + 7919 * (switch + 1)) % (2**63))
        return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like.device)

    def stats(self) -> dict[str, Any]:
        if not self.stages_taken():
            return dict(self.last_stats)
        return {
            "plugin": repr(self.cfg),
            "stages": [
                {"steps": s.steps, "latent_size": list(s.size), "sigmas": [round(x, 4) for x in s.sigmas]}
                for s in self.plan
            ],
            "steps_taken": self.i,
            "denoiser_calls": self.denoiser_calls,
        }


@compiled_around("pre_forward")
class _StageInputsHook(ModelHook):
    """Pre-forward hook on the denoiser: stage timestep and (Flux) token positions."""

    def __init__(self, owner: _Bottleneck):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, self.owner.stage_inputs(kwargs)


def _seed_from(sample: torch.Tensor) -> int:
    """A seed determined by the call's initial latents (same generator -> same re-noising)."""
    data = sample.detach().float().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % (2**63)
