"""Running a local Diffusers pipeline folder as the command line, the demo and the bench do: find
and check the folder (the embedded default model too), load it offline with safetensors only, read
its shipped generation settings (``diffboost.json``), and time one seeded call.

Sits above the runtime (which never imports it), below ``cli``, ``batch``, ``app`` and ``bench``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("diffboost")

DEFAULT_PROMPT = "a large red circle at the left on a white background"


DEFAULT_MODEL = "flux-shapes"


def default_model_candidates(name: str = DEFAULT_MODEL) -> list[Path]:
    """Where the embedded default model is looked for, in order: ``$DIFFBOOST_ASSETS/flux-shapes``
    (when set), ``diffboost/assets/flux-shapes`` inside an installed wheel (``pip install .``), and
    ``<repository>/assets/flux-shapes`` in a source checkout (``pip install -e .``)."""
    here = Path(__file__).resolve().parent
    found = [here / "assets" / name, here.parent / "assets" / name]
    root = os.environ.get("DIFFBOOST_ASSETS")
    return ([Path(root) / name] if root else []) + found


def default_model_path() -> Path:
    """The embedded reference model (see :func:`default_model_candidates`); raises a clear error
    naming the places looked at and the fix when none holds it."""
    candidates = default_model_candidates()
    if os.environ.get("DIFFBOOST_ASSETS"):  # an explicit setting is used as it is, or refused
        candidates = candidates[:1]
    for path in candidates:
        if (path / "model_index.json").is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"the embedded default model ({DEFAULT_MODEL}) is not installed (looked in: {looked}). Reinstall diffboost "
        "(pip install . or pip install -e . from the repository; the wheel ships it), set DIFFBOOST_ASSETS to the "
        "folder that holds flux-shapes/, or pass --model PATH to a Diffusers pipeline folder"
    )


def check_model_folder(path: str | Path) -> Path:
    """A local Diffusers pipeline folder diffboost can load: ``model_index.json`` and, for every
    component folder with weights, safetensors files (pickled ``.bin``/``.pt``/``.ckpt`` weights are
    refused: loading them can run arbitrary code). Cheap: reads file names only."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; pass --model PATH to a Diffusers pipeline folder")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Diffusers pipeline folder (no model_index.json); pass --model PATH to a folder "
            "saved with save_pretrained"
        )
    for part in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f.name for f in part.iterdir() if f.is_file()]
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickled and not any(f.endswith(".safetensors") for f in files):
            raise ValueError(
                f"{part} holds only pickled weights ({', '.join(sorted(pickled))}); diffboost loads safetensors only. "
                "Convert the folder once: load it with DiffusionPipeline.from_pretrained(path) in a trusted "
                "environment and save it with save_pretrained(path, safe_serialization=True)"
            )
    return path


def student_of(model: Path) -> Path | None:
    """The distilled student shipped next to a model folder (``<model>-1step`` with a ``distill.json``,
    written by ``diffboost distill``), or None."""
    candidate = Path(model).with_name(Path(model).name + "-1step")
    return candidate if (candidate / "distill.json").is_file() else None


def is_student(model: Path) -> bool:
    """Whether a model folder is a distilled student (it has a ``distill.json``)."""
    return (Path(model) / "distill.json").is_file()


def load_pipeline(path: str | Path, dtype: str = "float32", device: str | None = None) -> Any:
    """Load a local Diffusers pipeline folder: safetensors only, no remote code, no network."""
    import torch
    from diffusers import DiffusionPipeline

    path = check_model_folder(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=True, local_files_only=True
        )
    except (OSError, EnvironmentError) as err:
        raise ValueError(f"cannot load the pipeline folder {path}: {err}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


#: ``diffboost.json`` keys passed to the pipeline call as they are (when the pipeline accepts them)
CALL_DEFAULTS = ("guidance_scale", "true_cfg_scale", "negative_prompt", "num_frames")


def model_defaults(path: Path) -> dict[str, Any]:
    """Generation defaults shipped next to a reference model (``diffboost.json``: height, width, steps...)."""
    import json

    f = path / "diffboost.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def default_call_kwargs(pipe: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Size and text length the model was made for: ``diffboost.json`` first, else the VAE's
    ``sample_size`` (Flux pipelines otherwise default to 1024 px whatever the model) and, for
    pipelines with a ``max_sequence_length`` argument, the T5 tokenizer's length when shorter."""
    import inspect

    kwargs: dict[str, Any] = {}
    size = defaults.get("height") or getattr(getattr(getattr(pipe, "vae", None), "config", None), "sample_size", None)
    if isinstance(size, int):
        kwargs["height"] = kwargs["width"] = size
    if "width" in defaults:
        kwargs["width"] = defaults["width"]
    params = inspect.signature(type(pipe).__call__).parameters
    tok = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
    length = defaults.get("max_sequence_length") or getattr(tok, "model_max_length", None)
    if "max_sequence_length" in params and isinstance(length, int) and length < params["max_sequence_length"].default:
        kwargs["max_sequence_length"] = length
    for key in CALL_DEFAULTS:  # guidance settings the model was evaluated with
        if key in defaults and key in params:
            kwargs[key] = defaults[key]
    return kwargs


def guidance_setting(pipe: Any) -> str | None:
    """The pipeline argument that ``--guidance`` sets: ``true_cfg_scale`` on Flux-style pipelines
    whose transformer has no guidance embedding (``guidance_scale`` would be silently ignored there:
    the default reference model is one), else ``guidance_scale``; None when the pipeline has neither."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    if "true_cfg_scale" in params and config is not None and not getattr(config, "guidance_embeds", True):
        return "true_cfg_scale"
    if "guidance_scale" in params:
        return "guidance_scale"
    return None


def guidance_kwargs(pipe: Any, guidance: float | None) -> dict[str, Any]:
    """Call arguments for a ``--guidance`` value (empty for None); warns once per pipeline when it
    has no guidance setting at all."""
    if guidance is None:
        return {}
    key = guidance_setting(pipe)
    if key is None:
        if not getattr(pipe, "_diffboost_guidance_warned", False):
            logger.warning("%s has no guidance setting; --guidance %g is ignored", type(pipe).__name__, guidance)
            pipe._diffboost_guidance_warned = True
        return {}
    kwargs: dict[str, Any] = {key: guidance}
    if key == "true_cfg_scale":
        kwargs["negative_prompt"] = ""  # Flux applies true CFG only when a negative prompt is given
    return kwargs


def _add_guidance(pipe: Any, kwargs: dict[str, Any], guidance: float | None) -> None:
    """``guidance`` into the call arguments (:func:`guidance_kwargs`); a negative prompt already there
    (the row's or the model's) wins over the empty one true CFG needs."""
    knob = guidance_kwargs(pipe, guidance)
    if "negative_prompt" in kwargs:
        knob.pop("negative_prompt", None)
    kwargs.update(knob)


def _timed_call(pipe: Any, kwargs: dict[str, Any]) -> tuple[Any, float]:
    """The pipeline's output and the seconds it took (CUDA synchronised on both ends)."""
    import torch

    cuda = getattr(pipe, "device", torch.device("cpu")).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = pipe(**kwargs)
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def generate_once(
    pipe: Any, prompt: str, steps: int, seed: int, size: int | None, guidance: float | None, extra: dict[str, Any]
) -> tuple[Any, float]:
    import torch

    kwargs: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps, **extra}
    if size:
        kwargs["height"] = kwargs["width"] = size
    _add_guidance(pipe, kwargs, guidance)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    result, took = _timed_call(pipe, kwargs)
    return result.images[0], took


def is_video_pipeline(pipe: Any) -> bool:
    """Whether the pipeline makes videos (its call takes ``num_frames``)."""
    import inspect

    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def size_multiple(pipe: Any) -> int:
    """The number of pixels an image side must be a multiple of for this pipeline to take it as it is
    (Flux-style pipelines resize other sizes with only a warning): the VAE's downsampling times the
    transformer's patch (and the 2 x 2 packing of Flux-style latents)."""
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8
    if hasattr(pipe, "_pack_latents"):  # the 2 x 2 packing is the patch of these pipelines
        return int(factor) * 2
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", 1) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return int(factor) * int(patch)


def generate_jobs(pipe: Any, jobs: list[Any], extra: dict[str, Any]) -> tuple[list[Any], float]:
    """One pipeline call for ``jobs`` (:class:`diffboost.batch.BatchJob` with equal steps, size,
    guidance and extra arguments): a prompt and a seeded generator per job, so that an output does
    not depend on its batch neighbours' seeds. Returns the outputs (PIL images, or each video's
    frames) and the seconds the call took. A size the pipeline does not take is a ``ValueError``."""
    import torch

    first = jobs[0]
    kwargs: dict[str, Any] = {**extra, **first.call_kwargs()}
    multiple = size_multiple(pipe)
    for key in ("height", "width"):
        if key in kwargs and kwargs[key] % multiple:
            raise ValueError(f"{key} {kwargs[key]} px is not a multiple of {multiple}, which {type(pipe).__name__} "
                             f"needs; use {kwargs[key] // multiple * multiple or multiple}")
    kwargs["prompt"] = [j.prompt for j in jobs] if len(jobs) > 1 else first.prompt
    kwargs["num_inference_steps"] = first.steps
    _add_guidance(pipe, kwargs, first.guidance)
    if len(jobs) > 1:
        negatives = [j.negative_prompt for j in jobs]
        if any(n is not None for n in negatives):
            kwargs["negative_prompt"] = [n or "" for n in negatives]
        elif isinstance(kwargs.get("negative_prompt"), str):
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(jobs)
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    kwargs["generator"] = generators if len(jobs) > 1 else generators[0]
    video = is_video_pipeline(pipe)
    if video:
        kwargs["output_type"] = "np"
    result, took = _timed_call(pipe, kwargs)
    outputs = list(result.frames) if video else list(result.images)
    if len(outputs) != len(jobs):
        raise RuntimeError(f"{type(pipe).__name__} returned {len(outputs)} outputs for {len(jobs)} prompts")
    return outputs, took


def save_image_atomic(image: Any, path: str | Path) -> None:
    """Write an image so that a crash never leaves a truncated file behind (format from the suffix)."""
    from .batch import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)


def call_counts(info: dict[str, Any]) -> tuple[int, int] | None:
    """(denoiser calls computed, all denoiser calls) in the last call of an accelerated pipeline, from
    ``describe()``'s summary (every plugin kind reports the calls it reused or skipped); None when the
    pipeline is not accelerated."""
    summary = info.get("summary")
    if not summary:
        return None
    return summary["computed"], summary["denoiser_calls"]