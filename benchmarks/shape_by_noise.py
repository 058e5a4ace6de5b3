"""At which noise level does an SD reference model lose a prompt's attributes? Image-to-image from the
true scene.

    python benchmarks/shape_by_noise.py --model assets/sd-shapes --prompts 64 --strengths 0.25 0.5 0.75 1.0

For each benchmark prompt the scene it describes is rendered (``scenes.render``), encoded by the
pipeline's VAE, noised to ``strength`` of the schedule (diffusers' img2img: t = strength x 1000) and
denoised by the model with the folder's call settings (CFG, steps x strength DDIM steps); the
evaluator then reads the result. At strength 1 (zero terminal SNR: x_T is pure noise) this is plain
text-to-image; at small strengths the model only refines the true scene. The strength at which an
attribute's accuracy falls tells at which part of the schedule the model fails to form it. Adherence is
printed per strength, split by object size (small / large), as JSON lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from diffboost.bench.cli import model_call_defaults
from diffboost.cli import load_pipeline, model_defaults
from diffboost_reference.data import scenes
from diffboost_reference.training.evaluate import refine_and_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True, help="a StableDiffusionPipeline folder")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-seed", type=int, default=1)
    ap.add_argument("--strengths", type=float, nargs="+", default=(0.25, 0.5, 0.75, 1.0))
    ap.add_argument("--steps", type=int, default=None, help="steps of the full schedule (default: the model's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.prompts < 1:
        ap.error(f"--prompts must be >= 1, got {args.prompts}")
    if any(not 0 < s <= 1 for s in args.strengths):
        ap.error(f"--strengths must lie in (0, 1], got {args.strengths}")
    torch.set_num_threads(args.threads)
    base = load_pipeline(args.model)
    if not isinstance(base, StableDiffusionPipeline):
        ap.error(f"--model must be a StableDiffusionPipeline folder, got {type(base).__name__}")
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or int(model_defaults(args.model).get("steps", 28))
    kwargs = model_call_defaults(args.model)
    prompts = scenes.benchmark_prompts(args.prompts, seed=args.prompt_seed)
    for strength in args.strengths:
        acc = refine_and_score(pipe, prompts, strength, steps, **kwargs)["accuracy"]
        print(json.dumps({"model": str(args.model), "prompt_seed": args.prompt_seed, "strength": strength,
                          "steps": steps, "accuracy": acc}), flush=True)


if __name__ == "__main__":
    main()
