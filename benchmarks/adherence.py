"""Prompt adherence of a local pipeline folder at a chosen size, scored by the shipped evaluator.

    python benchmarks/adherence.py --model assets/flux-shapes --size 128 --prompts 16 [--prompt-seed 2] [--call-kwargs '{"guidance_scale": 5}']

Uses the trainers' evaluation (``generate_and_score``: the first N benchmark prompts, seeds from 0)
with the folder's ``diffboost.json`` call settings (CFG, text length) and prints the per-attribute
accuracy; ``--grid FILE`` also saves the images as one PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffboost.bench.cli import model_call_defaults
from diffboost.cli import load_pipeline, model_defaults
from diffboost.training.evaluate import generate_and_score, save_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: the model's)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's, else 28")
    ap.add_argument("--prompt-seed", type=int, default=1,
                    help="seed of the benchmark prompt list (default 1: the set every adherence in TRAINING.md uses)")
    ap.add_argument("--call-kwargs", type=json.loads, default={},
                    help='pipeline call arguments as JSON over the model\'s diffboost.json, e.g. \'{"guidance_scale": 5}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    defaults = model_defaults(args.model)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**model_call_defaults(args.model), **args.call_kwargs}
    if "max_sequence_length" in defaults:
        kwargs["max_sequence_length"] = defaults["max_sequence_length"]
    size = args.size or int(defaults.get("height", 64))
    steps = args.steps or int(defaults.get("steps", 28))
    res = generate_and_score(pipe, args.prompts, steps, seed=0, size=size, prompt_seed=args.prompt_seed, **kwargs)
    if args.grid:
        save_grid(res["images"], args.grid)
    print(json.dumps({"model": str(args.model), "size": size, "prompts": args.prompts, "prompt_seed": args.prompt_seed,
                      "steps": steps, "call_kwargs": kwargs, "accuracy": res.get("accuracy")}))


if __name__ == "__main__":
    main()
