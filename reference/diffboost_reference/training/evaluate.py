"""Generation-time evaluation and saving helpers shared by the reference-model trainers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from diffboost_reference.data import scenes

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_and_score(
    pipe: DiffusionPipeline, n_prompts: int, steps: int, seed: int = 0, batch_size: int = 32, size: int = 64,
    prompt_seed: int = 1, **call_kwargs: Any,
) -> dict[str, Any]:
    """Generate the first ``n_prompts`` benchmark prompts at ``size`` x ``size`` px and score them with
    the evaluator (which reads every image at 64 px). ``prompt_seed``: the seed of the balanced prompt
    list (``scenes.benchmark_prompts``); 1, the default, is the set every reported adherence uses.

    Returns ``images`` (uint8 N,size,size,3), ``prompts`` and, when the evaluator is shipped,
    ``accuracy`` (per attribute and ``all`` = prompt adherence).
    """
    prompts = scenes.benchmark_prompts(n_prompts, seed=prompt_seed)
    chunks = []
    for i in range(0, n_prompts, batch_size):
        out = pipe(
            prompts[i : i + batch_size], height=size, width=size, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + i), output_type="np", **call_kwargs,
        ).images
        chunks.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    images = np.concatenate(chunks)
    result: dict[str, Any] = {"images": images, "prompts": prompts}
    from diffboost_reference.evaluation.classifier import evaluator_available, load_evaluator
    from diffboost_reference.evaluation.metrics import attribute_accuracy

    if evaluator_available():
        result["accuracy"] = attribute_accuracy(images, prompts, load_evaluator())
    return result


@torch.no_grad()
def refine_and_score(
    pipe: DiffusionPipeline, prompts: list[str], strength: float, steps: int, batch_size: int = 32,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Image-to-image from each prompt's true scene, scored by the evaluator: where in the schedule a model
    loses an attribute.

    ``pipe`` is an img2img pipeline (e.g. ``StableDiffusionImg2ImgPipeline(**sd.components)``). Each
    prompt's scene is rendered (scene seed = its index), encoded, noised to ``strength`` of the schedule
    (t = strength x T) and denoised in ``steps`` x ``strength`` steps (generator seed: the batch's first
    index, as in :func:`generate_and_score`). Returns ``truth`` and ``images`` (uint8 N,H,W,3) and
    ``accuracy``: per-attribute accuracy for ``all`` prompts and split by object size (``small`` /
    ``large``; single-object prompts). Needs the shipped evaluator.
    """
    from diffboost_reference.evaluation.classifier import load_evaluator
    from diffboost_reference.evaluation.metrics import attribute_accuracy

    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    truth = [scenes.render(scenes.parse_spec(p), seed=i) for i, p in enumerate(prompts)]
    chunks = []
    for i in range(0, len(prompts), batch_size):
        images = torch.from_numpy(np.stack(truth[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
        out = pipe(prompts[i : i + batch_size], image=images, strength=strength, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(i), output_type="np", **call_kwargs).images
        chunks.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    images = np.concatenate(chunks)
    evaluator = load_evaluator()
    accuracy = {"all": attribute_accuracy(images, prompts, evaluator)}
    for size in ("small", "large"):
        keep = [k for k, p in enumerate(prompts) if scenes.parse_caption(p).get("size") == size]
        if keep:
            accuracy[size] = attribute_accuracy(images[keep], [prompts[k] for k in keep], evaluator)
    return {"truth": np.stack(truth), "images": images, "accuracy": accuracy}


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    """Save uint8 images (N, H, W, 3) as one PNG grid."""
    from PIL import Image

    cols = min(cols, len(images))
    n = (len(images) // cols) * cols
    h, w = images.shape[1:3]
    grid = images[:n].reshape(-1, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(-1, cols * w, 3)
    Image.fromarray(grid).save(path)


def save_pipeline(pipe: DiffusionPipeline, out: Path, info: dict[str, Any],
                  defaults: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` (safetensors) into a temp folder, then swap it into place.

    ``defaults``: the generation settings the model was evaluated with, written as ``diffboost.json``
    (read by ``diffboost generate`` / ``diffboost bench``: height, width, steps and call arguments).
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2))
    if defaults:
        (tmp / "diffboost.json").write_text(json.dumps(defaults, indent=2))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("saved pipeline -> %s", out)


def export_checkpoint(
    pipe: DiffusionPipeline,
    args: Any,
    step: int,
    history: list,
    call_kwargs: dict[str, Any],
    defaults: dict[str, Any],
    **extra_info: Any,
) -> dict[str, Any]:
    """``--export`` of both trainers: score ``pipe`` (the checkpoint's EMA weights) on
    ``args.eval_prompts`` prompts at ``args.eval_steps`` steps with ``call_kwargs``, save a sample grid
    under ``args.work_dir`` and the pipeline (with ``training_info.json`` and ``defaults`` as
    ``diffboost.json``) to ``args.out``. Returns the evaluation result."""
    res = generate_and_score(pipe, args.eval_prompts, args.eval_steps, seed=args.seed,
                             size=getattr(args, "size", 64), **call_kwargs)
    save_grid(res["images"], Path(args.work_dir) / f"export_{step:06d}.png")
    logger.info("export step %d, %d prompts: %s", step, args.eval_prompts, json.dumps(res.get("accuracy")))
    info = {"step": step, "eval_prompts": args.eval_prompts, "eval_steps": args.eval_steps, **extra_info,
            "accuracy": res.get("accuracy"), "history": history}
    save_pipeline(pipe, args.out, info, defaults)
    return res
