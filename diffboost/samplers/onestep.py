"""``OneStep``: serve a distilled student (``diffboost distill``) inside the teacher's pipeline.

The student is a denoiser of the teacher's class trained to reach the teacher's images in 1..N
Euler steps of the linear schedule (:mod:`diffboost.distill.reflow`), with the teacher's guidance
baked in. On ``apply``:

- the student's weights go into the pipeline's denoiser (the teacher's tensors are kept aside, not
  copied, and put back by ``remove()``: bit-identical afterwards);
- the scheduler's ``set_timesteps`` is wrapped: after the pipeline's own schedule is set, the
  sigmas become ``linspace(1, 1/steps, steps)`` (whatever step count the call asked for);
- the second CFG pass of each step (Flux's true CFG ``"uncond"``) is answered with the first pass's
  output, without a denoiser call: ``uncond + s * (cond - uncond)`` is then ``cond``, which is what a
  guidance-distilled student must give.

Caches and step plugins are refused (one step has nothing to reuse); attention kernels stack.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..plugins.adapters import Denoiser, PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import CallStats, Installed, Plugin, PluginKind, check_int
from ..plugins.runtime import BranchStates, CallTracker, HookSet, InstanceWrap

logger = logging.getLogger("diffboost")

HOOK_NAME = "diffboost.onestep"


@dataclasses.dataclass(frozen=True)
class OneStep(Plugin):
    """Generate with a distilled student in ``steps`` steps.

    Args:
        path: the student's pipeline folder, as ``diffboost distill`` writes it (``distill.json``
            and the denoiser's subfolder, safetensors).
        steps: Euler steps of the linear schedule, 1 (default) up to the largest step count the
            student was trained for (``distill.json``'s ``student_steps``; 4 by default).
    """

    kind: ClassVar[PluginKind] = PluginKind.SAMPLER
    #: kinds that cannot stack with it, and why
    refuses: ClassVar[dict[PluginKind, str]] = {
        PluginKind.CACHE: "a one-step student computes each step once: there is nothing to cache",
        PluginKind.STEP: "a one-step student has no steps to skip",
    }
    path: str = ""
    steps: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("OneStep.path must name a student folder written by diffboost distill")
        check_int(self, "steps", 1, 16)

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        return [InstalledOneStep(self, adapter, tracker)]


def read_student(path: str | Path) -> dict[str, Any]:
    """``distill.json`` of a student folder, with a clear error when it is not one."""
    folder = Path(path)
    info = folder / "distill.json"
    if not info.is_file():
        raise FileNotFoundError(f"{folder} is not a distilled student folder (no distill.json); make one with "
                                "diffboost distill")
    return json.loads(info.read_text())


class _Pass:
    """Per CFG pass: nothing to keep (the pass name is what matters)."""

    def reset(self) -> None:
        pass


class _CFGShare(ModelHook):
    """On the denoiser: the first pass of a step computes; a later pass of the same step gets its output."""

    _is_stateful = True

    def __init__(self, owner: "InstalledOneStep"):
        super().__init__()
        self.owner = owner
        self.state = BranchStates(_Pass)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        owner.check_scheduler()
        step = owner.tracker.step
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        last = owner.last
        if last is not None and last[0] == step and last[1] != self.state.branch and hidden is not None \
                and last[2] == tuple(hidden.shape):
            owner.reused[self.state.branch] = owner.reused.get(self.state.branch, 0) + 1
            owner.reused_steps.add(step)
            return last[3]
        out = self.fn_ref.original_forward(*args, **kwargs)
        owner.computed += 1
        owner.last = (step, self.state.branch, None if hidden is None else tuple(hidden.shape), out)
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


class InstalledOneStep(Installed):
    def __init__(self, cfg: OneStep, adapter: PipelineAdapter, tracker: CallTracker):
        self.cfg, self.adapter, self.tracker = cfg, adapter, tracker
        info = read_student(cfg.path)
        trained = [int(n) for n in info.get("student_steps", [1])]
        if cfg.steps not in trained:
            raise ValueError(f"OneStep.steps={cfg.steps}: this student was trained for {trained} steps")
        if not adapter.is_flow_matching:
            raise UnsupportedPipelineError(
                f"OneStep serves flow-matching students (FlowMatchEulerDiscreteScheduler); {type(adapter.pipe).__name__} "
                f"uses {type(adapter.scheduler).__name__}")
        denoisers = list(adapter)
        if len(denoisers) != 1:
            raise UnsupportedPipelineError(f"OneStep needs a pipeline with one denoiser; "
                                           f"{type(adapter.pipe).__name__} has {len(denoisers)}")
        self.denoiser: Denoiser = denoisers[0]
        module = self.denoiser.module
        weights = student_weights(cfg.path, self.denoiser.attr, module)
        self.computed = 0
        self.reused: dict[str, int] = {}
        self.reused_steps: set[int] = set()
        self.last: tuple | None = None
        self.last_stats: dict[str, Any] = {}
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scheduler = adapter.pipe.scheduler
        self._patch: InstanceWrap | None = None
        self.hooks: HookSet | None = None
        try:
            with torch.no_grad():
                for name, tensor in module.state_dict(keep_vars=True).items():
                    self._saved.append((tensor, tensor.data))
                    tensor.data = weights[name].to(device=tensor.device, dtype=tensor.dtype)
            self._patch = InstanceWrap(self.scheduler, "set_timesteps", self._make_set_timesteps)
            self.hooks = HookSet(HOOK_NAME, module)
            self.hooks.add(module, _CFGShare(self))
        except BaseException:
            self.remove()
            raise

    def _make_set_timesteps(self, original: Any) -> Any:
        scheduler, steps = self.scheduler, self.cfg.steps

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            device = scheduler.timesteps.device
            sigmas = torch.tensor([1.0 - i / steps for i in range(steps)] + [0.0], dtype=torch.float32, device=device)
            scheduler.sigmas = sigmas
            scheduler.timesteps = sigmas[:-1] * scheduler.config.num_train_timesteps
            scheduler.num_inference_steps = steps
            scheduler._step_index = None
            scheduler._begin_index = None
            self.tracker.num_steps = steps
            return out

        return set_timesteps

    def check_scheduler(self) -> None:
        if self.adapter.pipe.scheduler is not self.scheduler:
            raise RuntimeError("OneStep: the pipeline's scheduler was replaced after apply(); "
                               "call diffboost.remove(pipe) and apply OneStep again")

    def reset(self) -> None:
        if self.computed:
            self.last_stats = self._stats()
        self.computed, self.reused, self.reused_steps, self.last = 0, {}, set(), None

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        with torch.no_grad():
            for tensor, original in reversed(self._saved):
                tensor.data = original
        self._saved = []

    def _stats(self) -> dict[str, Any]:
        return {"plugin": repr(self.cfg), "steps": self.cfg.steps, "denoiser_calls": self.computed,
                "cfg_passes_shared": sum(self.reused.values()), "reused": dict(self.reused),
                "reused_steps": sorted(self.reused_steps)}

    def stats(self) -> dict[str, Any]:
        return self._stats() if self.computed else dict(self.last_stats)

    def call_stats(self) -> CallStats:
        s = self.stats()
        return CallStats(repr(self.cfg), reused=dict(s.get("reused", {})),
                         skipped_steps=tuple(s.get("reused_steps", ())), details=s)


def student_weights(path: str, attr: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a student folder's denoiser ``attr``, checked against ``module`` (same class,
    configuration and weight names); also what ``diffboost distill --init`` starts from."""
    folder = Path(path) / attr
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} has no {attr}/ folder: it is not a student of a pipeline with a {attr}")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != type(module).__name__:
        raise UnsupportedPipelineError(f"the student in {path} is a {config.get('_class_name')}; this pipeline's "
                                       f"{attr} is a {type(module).__name__}")
    mine = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    theirs = {k: v for k, v in config.items() if not k.startswith("_")}
    differ = sorted(k for k in set(mine) | set(theirs)
                    if json.dumps(mine.get(k), default=list) != json.dumps(theirs.get(k), default=list))
    if differ:
        raise UnsupportedPipelineError(f"the student in {path} has another {attr} configuration than this pipeline "
                                       f"({', '.join(differ)}): distil it from this teacher")
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    expected = set(module.state_dict().keys())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise UnsupportedPipelineError(f"the student's weights in {folder} do not match this {attr} "
                                       f"(missing {missing}, unexpected {extra})")
    return weights
