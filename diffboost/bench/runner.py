"""Run every configuration on prompts x seeds in one process and measure speed and fidelity."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from diffboost_reference.data.scenes import benchmark_prompts, vocabulary
from diffboost_reference.evaluation import metrics
from diffboost_reference.evaluation.classifier import DEFAULT_EVALUATOR_DIR, evaluator_available, load_evaluator
from diffboost_reference.evaluation.images import to_tensor01

from ..fidelity import pooled_psnr
from .accelerators import Unavailable, denoiser_of, install
from .configs import RIVAL_KINDS, BenchConfig
from .flops import count_denoiser_flops

logger = logging.getLogger(__name__)

BATCH_ARGS = ("num_images_per_prompt", "num_videos_per_prompt")  # how pipelines take a per-prompt batch


@dataclasses.dataclass
class BenchSettings:
    """What to run: workload, repetitions and which metrics."""

    prompts: int = 8
    seeds: int = 2
    steps: int = 28
    repeats: int = 3
    height: int | None = None  # None: the model's default sample size (see resolve_size)
    width: int | None = None
    prompt_seed: int = 0
    count_flops: bool = True
    evaluator: Path | None = DEFAULT_EVALUATOR_DIR  # None: no evaluator metrics
    adherence: str = "auto"  # auto | on | off
    call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: bool = True
    device: str | None = None  # None: leave the pipeline where it is (a loaded one stays on CPU)
    dtype: str | None = None  # e.g. "bfloat16"; None: as loaded
    scheduler: str | None = None  # a diffusers scheduler class name built from the pipeline's config
    images_per_prompt: int = 1  # images per call (num_images_per_prompt): > 1 times batched calls


@dataclasses.dataclass
class ConfigResult:
    """One row of the report."""

    name: str
    kind: str
    description: str
    status: str = "ok"  # ok | skipped: <reason> | error: <reason>
    time_s: float = math.nan  # median over repeats of the mean seconds per image (call time / images per call)
    times_s: list[float] = dataclasses.field(default_factory=list)
    speedup: float = math.nan
    denoiser_flops: float = math.nan
    call_flops: float = math.nan
    flops_reduction: float = math.nan  # baseline denoiser FLOPs / this config's
    psnr: float = math.nan
    psnr_min: float = math.nan
    ssim: float = math.nan
    feature_distance: float = math.nan
    frechet: float = math.nan
    adherence: float = math.nan
    notes: list[str] = dataclasses.field(default_factory=list)
    images: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_rival(self) -> bool:
        return self.kind in RIVAL_KINDS


@dataclasses.dataclass
class BenchReport:
    """All results plus the context needed to reproduce them."""

    results: list[ConfigResult]
    settings: BenchSettings
    model: str
    size: tuple[int, int]
    prompts: list[str]
    seeds: list[int]
    notes: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# pipeline loading and call construction
# ----------------------------------------------------------------------------------------------


def load_pipeline(path: str | Path) -> Any:
    """Load a local Diffusers pipeline folder (safetensors only, never remote code)."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {path} does not exist; pass --model PATH to a local Diffusers pipeline folder "
            "(the default assets/flux-shapes is written by python -m diffboost_reference.training.train_flux)"
        )
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a Diffusers pipeline folder (no model_index.json)")
    return DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)


def resolve_size(pipe: Any, settings: BenchSettings) -> tuple[int, int]:
    """Image size: explicit settings, else the model's default sample size.

    The default is taken, in order, from the denoiser config's ``sample_size`` (latent units, times
    the VAE scale factor), the VAE config's ``sample_size`` (pixels), then the pipeline's
    ``default_sample_size`` (latent units).
    """
    if settings.height and settings.width:
        return settings.height, settings.width
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    size: int | None = None
    sample = getattr(getattr(denoiser_of(pipe), "config", None), "sample_size", None)
    if isinstance(sample, int):
        size = sample * scale
    elif isinstance(getattr(getattr(getattr(pipe, "vae", None), "config", None), "sample_size", None), int):
        size = pipe.vae.config.sample_size
    elif isinstance(getattr(pipe, "default_sample_size", None), int):
        size = pipe.default_sample_size * scale
    if size is None:
        raise ValueError(f"cannot infer the image size of {type(pipe).__name__}; pass --height and --width")
    return settings.height or size, settings.width or size


def base_call_kwargs(pipe: Any, settings: BenchSettings, size: tuple[int, int]) -> dict[str, Any]:
    """Keyword arguments shared by every call (prompt and generator are added per call).

    ``max_sequence_length`` defaults to the text tokenizer's ``model_max_length`` when that is below
    the pipeline's own default (models trained on short captions, like the reference model).
    """
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": settings.steps, "output_type": "np"}
    if "height" in params:
        kwargs.update(height=size[0], width=size[1])
    if "max_sequence_length" in params:
        tok = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
        limit = getattr(tok, "model_max_length", None)
        default = params["max_sequence_length"].default
        if isinstance(limit, int) and isinstance(default, int) and limit < default:
            kwargs["max_sequence_length"] = limit
    kwargs.update(settings.call_kwargs)
    if settings.images_per_prompt != 1:
        if settings.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {settings.images_per_prompt}")
        batch_arg = next((a for a in BATCH_ARGS if a in params), None)
        if batch_arg is None:
            raise ValueError(
                f"{type(pipe).__name__}.__call__ takes none of {', '.join(BATCH_ARGS)}: "
                "it cannot batch images per prompt; use images_per_prompt=1"
            )
        kwargs[batch_arg] = settings.images_per_prompt
    return kwargs


def _images_of(output: Any) -> np.ndarray:
    """Pipeline output -> float array (N, H, W, 3) in [0, 1]."""
    images = getattr(output, "images", None)
    if images is None:
        frames = getattr(output, "frames", None)
        if frames is None:
            raise TypeError(f"pipeline output {type(output).__name__} has neither .images nor .frames")
        images = np.concatenate([np.asarray(f) for f in frames])
    if isinstance(images, torch.Tensor):
        images = images.float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, list):  # PIL images
        images = to_tensor01(images).permute(0, 2, 3, 1).numpy()
    return np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


class Workload:
    """The bench's workload on a prepared pipeline: its prompts x seeds and exact call arguments.

    Scripts that need the same calls as ``diffboost bench`` (e.g. ``benchmarks/sada_matched.py``)
    build one with :func:`prepare_workload` and iterate ``jobs`` through ``call``.
    """

    def __init__(self, pipe: Any, settings: BenchSettings):
        self.pipe = pipe
        self.settings = settings
        self.size = resolve_size(pipe, settings)
        self.kwargs = base_call_kwargs(pipe, settings, self.size)
        self.prompts = benchmark_prompts(settings.prompts, seed=settings.prompt_seed)
        self.seeds = list(range(settings.seeds))
        self.jobs = [(p, s) for p in self.prompts for s in self.seeds]
        self.images_per_call = settings.images_per_prompt

    def call(self, prompt: str, seed: int, **overrides: Any) -> Any:
        """One pipeline call (CPU generator: the same noise on every device); waits for the device."""
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            output = self.pipe(prompt=prompt, generator=generator, **{**self.kwargs, **overrides})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return output


def prepare_workload(pipe_or_path: Any, settings: BenchSettings) -> Workload:
    """Load (from a folder) and place the pipeline as ``diffboost bench`` does (``--scheduler``,
    ``--dtype``, ``--device``, progress bars off) and return its :class:`Workload`."""
    pipe = load_pipeline(pipe_or_path) if isinstance(pipe_or_path, (str, Path)) else pipe_or_path
    pipe.set_progress_bar_config(disable=True)
    _place(pipe, settings)
    return Workload(pipe, settings)


class _Runner(Workload):
    """The workload plus the configs to run on it; runs them and collects raw results."""

    def __init__(self, pipe: Any, configs: list[BenchConfig], settings: BenchSettings):
        super().__init__(pipe, settings)
        self.configs = configs
        self.results = {c.name: ConfigResult(c.name, c.kind, c.describe()) for c in configs}
        # per-config state, plus one "workload" dict they all share: facts measured on the plain
        # workload (denoiser calls per step, MagCache ratios) are measured once, not once per config
        workload: dict[str, Any] = {}
        self.states: dict[str, dict[str, Any]] = {c.name: {"workload": workload} for c in configs}

    def probe(self) -> Any:
        return self.call(*self.jobs[0])

    def _guarded(self, config: BenchConfig, body: Callable[[], None]) -> None:
        """Install ``config``, run ``body``, always remove; failures become the config's status."""
        result = self.results[config.name]
        if not result.ok:
            return
        try:
            remove = install(config, self.pipe, self.settings.steps, self.probe, self.states[config.name])
        except Unavailable as exc:
            result.status = f"skipped: {exc}"
            logger.warning("%s skipped: %s", config.name, exc)
            return
        except Exception as exc:
            result.status = f"error: {type(exc).__name__}: {exc}"
            logger.exception("%s could not be installed", config.name)
            return
        note = self.states[config.name].get("auto_note")
        if note and note not in result.description:
            result.description += f"; {note}"
        try:
            body()
        except Exception as exc:
            result.status = f"error: {type(exc).__name__}: {exc}"
            logger.exception("%s failed while running", config.name)
        finally:
            remove()

    def count_flops(self, config: BenchConfig) -> None:
        """One FLOP-counted run on the first prompt and seed (doubles as this config's warm-up)."""
        result = self.results[config.name]

        def body() -> None:
            result.denoiser_flops, result.call_flops = count_denoiser_flops(self.pipe, self.probe)

        self._guarded(config, body if self.settings.count_flops else self.probe)

    def time_once(self, config: BenchConfig, first: bool, bar: Any) -> None:
        """All prompts x seeds once; keeps the images of the first repeat."""
        result = self.results[config.name]

        def body() -> None:
            images, elapsed = [], 0.0
            for prompt, seed in self.jobs:
                start = time.perf_counter()
                output = self.call(prompt, seed)
                elapsed += time.perf_counter() - start
                if first:
                    images.append(_images_of(output))
                bar.update(1)
            result.times_s.append(elapsed / (len(self.jobs) * self.images_per_call))
            if first:
                result.images = np.concatenate(images)

        self._guarded(config, body)

    def run(self) -> None:
        """FLOP pass, then ``repeats`` timed passes, interleaving configs (rotated order each repeat)."""
        for config in self.configs:
            self.count_flops(config)
        total = self.settings.repeats * len(self.configs) * len(self.jobs)
        with tqdm(total=total, desc="bench", unit="call", disable=not self.settings.progress) as bar:
            for r in range(self.settings.repeats):
                shift = r % len(self.configs)
                for config in self.configs[shift:] + self.configs[:shift]:
                    self.time_once(config, first=r == 0, bar=bar)
        for result in self.results.values():
            if result.ok and result.times_s:
                result.time_s = statistics.median(result.times_s)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def trained_on_scene_captions(pipe: Any) -> bool:
    """Whether the pipeline's tokenizer knows every word of the procedural scene captions."""
    tok = getattr(pipe, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_vocab"):
        return False
    vocab = {w.lower() for w in tok.get_vocab()}
    return all(word in vocab for word in vocabulary())


def fill_metrics(report: BenchReport, pipe: Any) -> None:
    """Speedup, FLOPs reduction and fidelity vs the baseline's images of the same prompt + seed."""
    results = report.results
    base = next(r for r in results if r.kind == "baseline")
    evaluator, note = _evaluator(report.settings.evaluator)
    if note:
        report.notes.append(note)
    adherence, why = _adherence_enabled(report.settings, pipe, evaluator)
    if why:
        report.notes.append(why)
    per_call = report.settings.images_per_prompt
    prompts = [p for p in report.prompts for _ in report.seeds for _ in range(per_call)]
    for r in results:
        if not r.ok or r.images is None or base.images is None:
            continue
        r.speedup = base.time_s / r.time_s if r.time_s > 0 else math.nan
        if r.denoiser_flops > 0:
            r.flops_reduction = base.denoiser_flops / r.denoiser_flops
        r.psnr, r.psnr_min = pooled_psnr(r.images, base.images)
        r.ssim = float(metrics.ssim(r.images, base.images))
        if evaluator is not None:
            # 1 - cos can come out a few ulps below 0 for identical images
            r.feature_distance = max(0.0, float(metrics.feature_distance(r.images, base.images, evaluator)))
            if len(r.images) >= 2:
                r.frechet = metrics.frechet_evaluator_distance(r.images, base.images, evaluator)
            if adherence:
                r.adherence = metrics.prompt_adherence(r.images, prompts, evaluator)
    n_images = len(base.images) if base.images is not None else 0
    if evaluator is not None and n_images < 2:
        report.notes.append("Fréchet distance needs at least 2 images (prompts x seeds >= 2); not computed")
    elif evaluator is not None and n_images <= evaluator.embed_dim:
        report.notes.append(
            f"Fréchet distance from {n_images} images in {evaluator.embed_dim}-d evaluator features: the "
            "covariances are rank-deficient, so compare it across configs only, not with published FIDs"
        )


def _evaluator(path: Path | None) -> tuple[Any | None, str]:
    if path is None:
        return None, "evaluator metrics disabled (--no-evaluator)"
    if not evaluator_available(path):
        return None, (
            f"no evaluator at {path}: evaluator-feature distance, Fréchet distance and prompt adherence "
            "not computed (train it with python -m diffboost_reference.training.train_evaluator)"
        )
    return load_evaluator(path), ""


def _adherence_enabled(settings: BenchSettings, pipe: Any, evaluator: Any) -> tuple[bool, str]:
    if settings.adherence == "off":
        return False, "prompt adherence disabled (--adherence off)"
    if evaluator is None:
        return False, ""
    if settings.adherence == "auto" and not trained_on_scene_captions(pipe):
        return False, (
            "prompt adherence skipped: the model's tokenizer does not cover the procedural scene captions, "
            "so it was not trained on them (force with --adherence on)"
        )
    return True, ""


def _place(pipe: Any, settings: BenchSettings) -> None:
    """Swap the scheduler, move / cast the pipeline as requested (``--scheduler`` / ``--device`` / ``--dtype``)."""
    if settings.scheduler is not None:
        import diffusers

        cls = getattr(diffusers, settings.scheduler, None)
        if not (isinstance(cls, type) and settings.scheduler.endswith("Scheduler")):
            raise ValueError(
                f"unknown scheduler {settings.scheduler!r}; give a diffusers scheduler class name such as "
                "EulerDiscreteScheduler or DPMSolverMultistepScheduler"
            )
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if settings.dtype is not None:
        dtype = getattr(torch, settings.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {settings.dtype!r}; use e.g. float32, bfloat16, float16")
        pipe.to(dtype=dtype)
    if settings.device is not None:
        pipe.to(settings.device)


def run_bench(
    pipe_or_path: Any, configs: list[BenchConfig], settings: BenchSettings | None = None
) -> BenchReport:
    """Benchmark ``configs`` on a pipeline object or a local pipeline folder; return the report.

    A ``baseline`` config is added first when the list has none (every metric is relative to it).
    """
    settings = settings or BenchSettings()
    if isinstance(pipe_or_path, (str, Path)):
        model, pipe = str(pipe_or_path), load_pipeline(pipe_or_path)
    else:
        model, pipe = type(pipe_or_path).__name__ + " (object)", pipe_or_path
    pipe.set_progress_bar_config(disable=True)
    _place(pipe, settings)
    configs = list(configs)
    if not any(c.kind == "baseline" for c in configs):
        configs.insert(0, BenchConfig("baseline"))
    configs.sort(key=lambda c: c.kind != "baseline")  # baseline first (stable for the rest)
    runner = _Runner(pipe, configs, settings)
    logger.info(
        "bench: %d configs x %d prompts x %d seeds x %d images per call, %d steps, %dx%d, %d repeats",
        len(configs), len(runner.prompts), len(runner.seeds), settings.images_per_prompt, settings.steps,
        *runner.size, settings.repeats,
    )
    runner.run()
    results = [runner.results[c.name] for c in configs]
    if not results[0].ok:
        raise RuntimeError(f"the baseline failed: {results[0].status}")
    report = BenchReport(results, settings, model, runner.size, runner.prompts, runner.seeds)
    fill_metrics(report, pipe)
    return report
