"""``diffboost.distill``: a teacher pipeline folder in, a one-step (and few-step) pipeline folder out.

Data-free: the teacher makes every training example (noise -> its final latent, with its steps and
its guidance; :mod:`diffboost.distill.pairs`). The student starts as a copy of the teacher's denoiser
and is trained by reflow regression (:mod:`diffboost.distill.reflow`). Everything lives in a work
folder: the pair shards, a checkpoint (student, optimizer, step, loss history) every ``save_every``
steps, written atomically. Run the same command again after an interruption and it continues from
the last checkpoint; with the same seed the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..batch import FolderLock
from ..files import umask, write_atomic, write_text_atomic
from ..plugins.base import check_choice, check_float, check_int
from ..samplers.onestep import student_weights
from . import dmd
from . import pairs as pair_io
from . import reflow
from .plot import plot_loss
from .teachers import teacher_for

logger = logging.getLogger("diffboost")

METHODS = ("reflow", "dmd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How a student is distilled (pure data; every field validated).

    Args:
        method: ``"reflow"``: rectified-flow reflow, one-step and few-step regression on teacher
            pairs; ``"dmd"``: DMD2 distribution matching (a fake score network trained online, the
            teacher's guided score as the real one) plus ``regression_weight`` times the reflow loss.
        train_steps: optimizer steps of the student (3000).
        pairs: teacher (noise, latent) pairs generated once and reused (8192).
        batch_size: pairs per optimizer step (64).
        lr: AdamW learning rate (1e-4; the student starts from the teacher's weights), with a
            linear warm-up over ``warmup`` steps (100) and a cosine decay to 10% at the end.
        max_student_steps: the student is trained for 1..N-step sampling, N = 4 by default.
        teacher_steps: the teacher's step count for the pairs (None: the model folder's default, else 28).
        shard_size, pair_batch: pairs per shard file (256) and per teacher call (64).
        save_every: checkpoint period in optimizer steps (250).
        seed: seeds the pairs' noise and every training batch (0).
        init: ``"teacher"`` (default) or a student folder whose denoiser the student starts from
            (e.g. a reflow student refined by ``method="dmd"``).
        fake_updates: DMD's fake-score updates per generator step (5; DMD2 uses 5-10).
        regression_weight: DMD's weight of the reflow regression in the generator loss (0.25).
    """

    method: str = "reflow"
    train_steps: int = 3000
    pairs: int = 8192
    batch_size: int = 64
    lr: float = 1e-4
    warmup: int = 100
    max_student_steps: int = 4
    teacher_steps: int | None = None
    shard_size: int = 256
    pair_batch: int = 64
    save_every: int = 250
    seed: int = 0
    init: str = "teacher"
    fake_updates: int = 5
    regression_weight: float = 0.25

    def __post_init__(self) -> None:
        check_choice(self, "method", METHODS)
        check_int(self, "train_steps", 1, 10_000_000)
        check_int(self, "pairs", 1, 100_000_000)
        check_int(self, "batch_size", 1, 65_536)
        check_float(self, "lr", 0.0, 1.0, lo_open=True)
        check_int(self, "warmup", 0, 10_000_000)
        check_int(self, "max_student_steps", 1, 16)
        if self.teacher_steps is not None:
            check_int(self, "teacher_steps", 1, 1000)
        check_int(self, "shard_size", 1, 1_000_000)
        check_int(self, "pair_batch", 1, 65_536)
        check_int(self, "save_every", 1, 10_000_000)
        check_int(self, "seed", 0, 2**63 - 1)
        if not isinstance(self.init, str) or not self.init:
            raise ValueError("DistillConfig.init must be 'teacher' or a student folder to start from")
        check_int(self, "fake_updates", 1, 100)
        check_float(self, "regression_weight", 0.0, 1000.0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(self.train_steps - self.warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step - self.warmup, span) / span)))



# --- checkpoints -------------------------------------------------------------------------------


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for index, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(json.loads(meta["scalars"]).items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def _opt_file(name: str) -> str:
    return "optimizer" if name == "student" else f"{name}_optimizer"


def _save_checkpoint(work: Path, method: "_Method", info: dict[str, Any]) -> None:
    for name, module in method.modules.items():
        weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        write_atomic(work / f"{name}.safetensors", lambda tmp, w=weights: save_file(w, tmp))
    for name, opt in method.optimizers.items():
        _save_optimizer(opt, work / f"{_opt_file(name)}.safetensors")
    write_text_atomic(work / "state.json", json.dumps(info, indent=1))  # last: names a complete checkpoint


# --- the methods -------------------------------------------------------------------------------


class _Method:
    """One optimizer step of a method: its trainable modules and optimizers by name (checkpointed)."""

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def step(self, g: torch.Generator) -> dict[str, float]:  # pragma: no cover - interface
        """One optimizer step; its named losses, the optimised one first."""
        raise NotImplementedError


def _descend(opt: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor) -> float:
    """One optimizer step on ``loss`` (gradients clipped to norm 1); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    return loss.item()


def _batch(data: dict[str, Any], keys: list[str], idx: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    return {k: data[k][idx].to(device) for k in keys}


class _Reflow(_Method):
    """Regression of the student's velocity on the straight line of teacher pairs, at the noise
    levels of 1..N-step sampling (:mod:`diffboost.distill.reflow`)."""


    def __init__(self, teacher: Any, data: dict[str, Any], student: torch.nn.Module, config: DistillConfig,
                 device: str):
        self.teacher, self.data, self.student, self.config, self.device = teacher, data, student, config, device
        self.modules = {"student": student}
        self.optimizers = {"student": torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)}
        sigmas, weights = reflow.training_sigmas(config.max_student_steps)
        self.sigmas, self.weights = torch.tensor(sigmas), torch.tensor(weights)
        self.cond_keys = [k for k in data if k not in ("noise", "x0", "prompts")]

    def regression(self, g: torch.Generator, batch_size: int) -> torch.Tensor:
        idx = torch.randint(self.data["noise"].shape[0], (batch_size,), generator=g)
        sigma = self.sigmas[torch.multinomial(self.weights, batch_size, replacement=True, generator=g)]
        z, x0 = self.data["noise"][idx].to(self.device), self.data["x0"][idx].to(self.device)
        cond = _batch(self.data, self.cond_keys, idx, self.device)
        x = reflow.interpolate(z, x0, sigma.to(self.device))
        return reflow.reflow_loss(self.teacher.velocity(self.student, x, sigma, cond), z, x0)

    def step(self, g: torch.Generator) -> dict[str, float]:
        return {"reflow": _descend(self.optimizers["student"], self.student, self.regression(g, self.config.batch_size))}


class _DMD(_Reflow):
    """DMD2 (:mod:`diffboost.distill.dmd`): the generator's one-step images pulled towards the
    teacher's distribution by the real-minus-fake score difference, the fake score network updated
    ``fake_updates`` times per generator step, plus ``regression_weight`` times the reflow regression
    on the teacher's pairs at every 1..N-step noise level (keeps the few-step schedule and anchors
    the generator to the teacher's noise-to-image map)."""


    def __init__(self, teacher: Any, data: dict[str, Any], student: torch.nn.Module, config: DistillConfig,
                 device: str, pipe: Any, call_kwargs: dict[str, Any]):
        super().__init__(teacher, data, student, config, device)
        self.fake = copy.deepcopy(pipe.transformer).float().to(device).train()
        self.fake.requires_grad_(True)
        self.real = pipe.transformer
        self.real.requires_grad_(False)
        self.modules["fake"] = self.fake
        self.optimizers["fake"] = torch.optim.AdamW(self.fake.parameters(), lr=config.lr, weight_decay=0.0)
        self.scale = float(call_kwargs.get("true_cfg_scale", call_kwargs.get("guidance_scale", 1.0)) or 1.0)
        with torch.no_grad():
            negative = call_kwargs.get("negative_prompt", "") or ""
            self.negative = teacher.encode([negative])

    def _generate(self, g: torch.Generator, n: int, with_grad: bool):
        idx = torch.randint(self.data["noise"].shape[0], (n,), generator=g)
        cond = _batch(self.data, self.cond_keys, idx, self.device)
        z = self.teacher.noise(n, g).to(self.device)
        one = torch.ones(n)
        with torch.set_grad_enabled(with_grad):
            x0 = z - self.teacher.velocity(self.student, z, one, cond)
        return x0, cond

    def _noised(self, g: torch.Generator, x0: torch.Tensor):
        t = 0.02 + 0.96 * torch.rand(x0.shape[0], generator=g)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        return t, noise, dmd.noise_to(x0, noise, t.to(self.device))

    def step(self, g: torch.Generator) -> dict[str, float]:
        cfg = self.config
        # the fake score: flow matching on the generator's current images
        opt_f = self.optimizers["fake"]
        fake_losses = []
        for _ in range(cfg.fake_updates):
            x0, cond = self._generate(g, cfg.batch_size, with_grad=False)
            t, noise, x_t = self._noised(g, x0)
            fake_losses.append(_descend(opt_f, self.fake, dmd.fake_score_loss(
                self.teacher.velocity(self.fake, x_t, t, cond), x0, noise)))
        # the generator
        x0, cond = self._generate(g, cfg.batch_size, with_grad=True)
        t, noise, x_t = self._noised(g, x0.detach())
        with torch.no_grad():
            neg = {k: v.expand(x0.shape[0], *v.shape[1:]).to(self.device) for k, v in self.negative.items()}
            v_real = dmd.guided(self.teacher.velocity(self.real, x_t, t, cond),
                                self.teacher.velocity(self.real, x_t, t, neg), self.scale)
            v_fake = self.teacher.velocity(self.fake, x_t, t, cond)
            tt = t.to(self.device)
            grad = dmd.dmd_gradient(x0.detach(), dmd.clean_prediction(x_t, tt, v_real),
                                    dmd.clean_prediction(x_t, tt, v_fake))
        matching = dmd.dmd_loss(x0, grad)
        regression = self.regression(g, cfg.batch_size) if cfg.regression_weight else torch.zeros(())
        total = _descend(self.optimizers["student"], self.student, matching + cfg.regression_weight * regression)
        return {"generator": total, "distribution matching": matching.item(), "reflow regression": regression.item(),
                "fake score": sum(fake_losses) / len(fake_losses)}


# --- the run -----------------------------------------------------------------------------------


def _check_out(out: Path, teacher: Path) -> None:
    if out.resolve() == teacher.resolve():
        raise ValueError(f"--out {out} is the teacher's folder; choose a new folder")
    if out.exists() and not (out / "distill.json").is_file():
        raise FileExistsError(f"{out} exists and is not a distilled model folder; choose a new --out or remove it")
    ancestor = out.resolve().parent
    while not ancestor.exists():  # folders still missing are made (out/ on a fresh checkout)
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise PermissionError(f"cannot write {out}: {ancestor} is not a writable folder")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)


def distill(teacher: str | Path, out: str | Path, prompts: list[str], config: DistillConfig = DistillConfig(), *,
            work: str | Path | None = None, pairs: str | Path | None = None, device: str = "cpu",
            resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Distil the pipeline folder ``teacher`` into a pipeline folder ``out`` that generates in
    1..``config.max_student_steps`` steps; returns the run's record (also ``out/distill.json``).

    ``work`` (default ``<out>.work``) keeps checkpoints and, unless ``pairs`` names another folder
    (shared by several runs on the same teacher), the teacher pairs: a rerun continues;
    ``resume=True`` insists on a checkpoint being there."""
    from ..generation import check_model_folder

    teacher_path = check_model_folder(teacher)
    out = Path(out)
    _check_out(out, teacher_path)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(work)  # one run per work folder: a second writer is refused, not interleaved
    if not lock.claim("0"):
        lock.close()
        raise ValueError(f"another diffboost distill is running on the work folder {work}; wait for it to finish "
                         "or use another --work folder")
    try:
        return _distill(teacher_path, out, prompts, config, work, pairs, device, resume, progress)
    finally:
        lock.close()  # the kernel drops the lock with the descriptor (and when a process dies)


def _distill(teacher_path: Path, out: Path, prompts: list[str], config: DistillConfig, work: Path,
             pairs: str | Path | None, device: str, resume: bool, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..generation import default_call_kwargs, load_pipeline, model_defaults

    defaults = model_defaults(teacher_path)
    teacher_steps = config.teacher_steps or int(defaults.get("steps", 28))
    record_cfg = dataclasses.asdict(config) | {"teacher_steps": teacher_steps}

    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if state is not None:
        defaults_now = dataclasses.asdict(DistillConfig())  # fields added later read as their defaults
        stored = {k: state["config"].get(k, defaults_now.get(k)) for k in record_cfg}
        differs = {k: (stored[k], v) for k, v in record_cfg.items() if stored[k] != v}
        if differs or state.get("teacher") != str(teacher_path.resolve()) or state.get("prompts") != len(prompts):
            raise ValueError(
                f"the work folder {work} holds a run with other settings ({differs or 'teacher or prompts'}); "
                "use the same settings to continue it, or another --work folder (or delete it) to start over")
    elif resume:
        raise FileNotFoundError(f"nothing to resume: {work} has no checkpoint (state.json)")

    pipe = load_pipeline(teacher_path, device=device)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = default_call_kwargs(pipe, defaults)
    t = teacher_for(pipe, call_kwargs)

    # 1. the teacher's pairs
    shards_dir = Path(pairs) if pairs is not None else work / "pairs"
    source = json.dumps({"teacher": str(teacher_path.resolve()), "call": call_kwargs}, sort_keys=True, default=str)
    with tqdm(total=config.pairs, desc="teacher pairs", unit="pair", disable=not progress) as bar:
        shards = pair_io.generate_pairs(t, prompts, shards_dir, count=config.pairs, shard_size=config.shard_size,
                                        batch=config.pair_batch, steps=teacher_steps, seed=config.seed,
                                        progress=bar.update, source=source)
    data = pair_io.load_pairs(shards)
    pair_minutes = data.pop("seconds") / 60

    # 2. the student (and, for DMD, the fake score network)
    student = copy.deepcopy(pipe.transformer).float().to(device).train()
    if config.init != "teacher":
        student.load_state_dict(student_weights(config.init, "transformer", student))
    student.requires_grad_(True)
    method: _Method = (_Reflow(t, data, student, config, device) if config.method == "reflow"
                       else _DMD(t, data, student, config, device, pipe, call_kwargs))
    history: list[list[float]] = []
    step, train_minutes = 0, 0.0
    if state is not None:
        for name, module in method.modules.items():
            module.load_state_dict(load_file(str(work / f"{name}.safetensors")))
        for name, opt in method.optimizers.items():
            _load_optimizer(opt, work / f"{_opt_file(name)}.safetensors")
        step, history = state["step"], state["history"]
        train_minutes = state["train_minutes"]
        logger.info("distill: continuing from step %d of %d (%s)", step, config.train_steps, work)

    def record() -> dict[str, Any]:
        return {"config": record_cfg, "teacher": str(teacher_path.resolve()), "prompts": len(prompts), "step": step,
                "history": history, "train_minutes": train_minutes, "pair_minutes": pair_minutes}

    t1 = time.perf_counter()
    window: dict[str, list[float]] = {}
    with tqdm(total=config.train_steps, initial=step, desc=f"distill ({config.method})", unit="step",
              disable=not progress) as bar:
        while step < config.train_steps:
            g = torch.Generator().manual_seed(config.seed * 7919 + step)
            for opt in method.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = config.lr_at(step)
            losses = method.step(g)  # named losses, the optimised one first
            bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
            if bad:
                raise FloatingPointError(f"distill: non-finite loss at step {step} ({bad}); lower --lr")
            step += 1
            for name, value in losses.items():
                window.setdefault(name, []).append(value)
            if step % 10 == 0 or step == config.train_steps:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                history.append([step, next(iter(means.values())), means])  # [step, loss, every named loss]
                window = {}
                bar.set_postfix(loss=f"{history[-1][1]:.4f}")
            bar.update(1)
            if step % config.save_every == 0 or step == config.train_steps:
                train_minutes += (time.perf_counter() - t1) / 60
                t1 = time.perf_counter()
                _save_checkpoint(work, method, record())
    if history:
        series: dict[str, tuple[list[int], list[float]]] = {}
        for entry in history:  # entries of runs before named losses were recorded: [step, loss]
            for name, value in (entry[2] if len(entry) > 2 else {"loss": entry[1]}).items():
                series.setdefault(name, ([], []))
                series[name][0].append(int(entry[0]))
                series[name][1].append(value)
        plot_loss(series, work / "loss.png", title=f"diffboost distill ({config.method}): losses, mean of 10 steps")

    # 3. the student's pipeline folder
    info = record() | {"method": config.method, "guidance": {k: v for k, v in call_kwargs.items()
                                                              if k in ("true_cfg_scale", "guidance_scale")},
                       "student_steps": list(range(1, config.max_student_steps + 1)),
                       "schedule": "linear sigmas linspace(1, 1/N, N) (FlowMatchEulerDiscreteScheduler, shift 1, "
                                   "no dynamic shifting)",
                       "teacher_defaults": defaults}
    _export(pipe, student, out, defaults, info, work)
    return info


def _export(pipe: Any, student: torch.nn.Module, out: Path, defaults: dict[str, Any],
            info: dict[str, Any], work: Path) -> None:
    """Save the teacher pipeline with the student denoiser and the linear schedule, atomically: a
    temporary folder next to ``out``, renamed onto it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher_denoiser, teacher_scheduler = pipe.transformer, pipe.scheduler
    student = student.eval().to(teacher_denoiser.dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                           shift=1.0)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        pipe.transformer, pipe.scheduler = student, scheduler
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        settings = {k: v for k, v in defaults.items() if k not in ("true_cfg_scale", "negative_prompt", "guidance_scale")}
        settings["steps"] = 1
        (tmp / "diffboost.json").write_text(json.dumps(settings, indent=2))
        (tmp / "distill.json").write_text(json.dumps(info, indent=1))
        if (work / "loss.png").is_file():
            shutil.copyfile(work / "loss.png", tmp / "loss.png")
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pipe.transformer, pipe.scheduler = teacher_denoiser, teacher_scheduler
