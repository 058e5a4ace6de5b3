"""Prompt adherence of a local pipeline folder at a chosen size, scored by the shipped evaluator.

    python benchmarks/adherence.py --model assets/flux-shapes --size 128 --prompts 16 [--prompt-seed 1 2] [--seed 0 1000] [--call-kwargs '{"guidance_scale": 5}']

Uses the trainers' evaluation (``generate_and_score``: the first N benchmark prompts, seeds from 0)
with the folder's ``diffboost.json`` call settings (CFG, text length) and prints the per-attribute
accuracy as one JSON line; ``--grid FILE`` also saves the images as one PNG. Several ``--prompt-seed``
and ``--seed`` values score every combination (one line each) and then the pooled accuracy over all
images: ``--prompts 64 --prompt-seed 1 2 3 4 --seed 0 1000 2000`` is the 768-image measure of
benchmarks/TRAINING.md (one 64-image cell has a standard error of about 4 points, 768 images 1.2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffboost.bench.cli import model_call_defaults
from diffboost.cli import load_pipeline, model_defaults
from diffboost_reference.training.evaluate import generate_and_score, save_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: the model's)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's, else 28")
    ap.add_argument("--prompt-seed", type=int, nargs="+", default=[1],
                    help="seed(s) of the benchmark prompt list (default 1: the set every adherence in TRAINING.md uses)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0],
                    help="generation seed(s) of the first image (default 0: the seeds every adherence in TRAINING.md uses)")
    ap.add_argument("--call-kwargs", type=json.loads, default={},
                    help='pipeline call arguments as JSON over the model\'s diffboost.json, e.g. \'{"guidance_scale": 5}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.prompts < 1:
        ap.error(f"--prompts must be >= 1, got {args.prompts}")
    cells = [(seed, prompt_seed) for seed in args.seed for prompt_seed in args.prompt_seed]
    if args.grid and len(cells) > 1:
        ap.error("--grid saves one cell's images: give one --prompt-seed and one --seed with it")
    torch.set_num_threads(args.threads)
    defaults = model_defaults(args.model)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**model_call_defaults(args.model), **args.call_kwargs}
    if "max_sequence_length" in defaults:
        kwargs["max_sequence_length"] = defaults["max_sequence_length"]
    size = args.size or int(defaults.get("height", 64))
    steps = args.steps or int(defaults.get("steps", 28))
    scores = []
    for seed, prompt_seed in cells:
        res = generate_and_score(pipe, args.prompts, steps, seed=seed, size=size, prompt_seed=prompt_seed, **kwargs)
        if args.grid:
            save_grid(res["images"], args.grid)
        scores.append(res.get("accuracy"))
        print(json.dumps({"model": str(args.model), "size": size, "prompts": args.prompts, "prompt_seed": prompt_seed,
                          "seed": seed, "steps": steps, "call_kwargs": kwargs, "accuracy": scores[-1]}), flush=True)
    if len(cells) > 1 and all(scores):  # equal-sized cells: the mean of the cells is the share over all images
        pooled = {k: sum(a[k] for a in scores) / len(scores) for k in scores[0]}
        print(json.dumps({"model": str(args.model), "pooled": {"cells": len(cells), "images": len(cells) * args.prompts,
                                                               "accuracy": pooled}}))


if __name__ == "__main__":
    main()
