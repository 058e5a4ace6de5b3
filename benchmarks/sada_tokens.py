"""SADA token-wise sparsity: CPU time of the plain SD pipeline, step-wise SADA and step + token SADA.

    OMP_NUM_THREADS=1 python benchmarks/sada_tokens.py [--size 256] [--steps 25] [--repeats 2]
        [--out benchmarks/results/sada_tokens.json]

Pipeline: the random-init SD pipeline of ``benchmarks/token_merging.py`` (its ``load``: a wider UNet
laid out like SD 1.x, self-attention at the full latent resolution), Euler scheduler, guidance 7.5,
``--size`` px. On random weights only the timings mean anything: PSNR against the baseline says how
far the output moved, not whether it is still a good image.

Configurations (acc_range scaled from the paper's (10, 47) of 50 steps to ``(steps // 5, steps - 3)``,
max_consecutive_skips 4, sx = sy = 3, token pruning on the highest-resolution blocks):

- ``baseline``; ``sada-step``: step-wise SADA; ``sada-tokens``: token-wise only (``schedule=()``
  switches step skipping off); ``sada-step+tokens``: both.

Every configuration runs once per round, interleaved; CPU time (process time) and wall time are the
medians over ``--repeats`` rounds after one warm-up image per configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import diffboost  # noqa: E402
from diffboost import SADA  # noqa: E402
from diffboost_reference.evaluation.metrics import psnr  # noqa: E402
from token_merging import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sada_tokens.json"))
    args = ap.parse_args()
    pipe, defaults, trained = load(args.size)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rng = (args.steps // 5, args.steps - 3)
    configs = {
        "baseline": None,
        "sada-step": SADA(acc_range=rng, lagrange_step=10_000),
        "sada-tokens": SADA(acc_range=rng, schedule=(), token_sparsity=True),
        "sada-step+tokens": SADA(acc_range=rng, lagrange_step=10_000, token_sparsity=True),
    }

    def image(plugin):
        kwargs = dict(defaults, prompt="a red circle", num_inference_steps=args.steps, output_type="pt")
        kwargs["generator"] = torch.Generator().manual_seed(0)
        stats = {}
        with torch.no_grad():
            if plugin is None:
                out = pipe(**kwargs).images
            else:
                with diffboost.accelerated(pipe, plugin):
                    out = pipe(**kwargs).images
                    stats = [s for s in diffboost.describe(pipe)["last_call"] if "skipped" in s][0]
        return out, stats

    outs, stats, cpu, wall = {}, {}, {k: [] for k in configs}, {k: [] for k in configs}
    for name, plugin in configs.items():
        outs[name], stats[name] = image(plugin)  # warm-up, also the fidelity sample
    for _ in range(args.repeats):
        for name, plugin in configs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            image(plugin)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    rows = []
    base_cpu = statistics.median(cpu["baseline"])
    for name in configs:
        s = stats[name]
        row = {
            "config": name,
            "cpu_s": round(statistics.median(cpu[name]), 2),
            "wall_s": round(statistics.median(wall[name]), 2),
            "speedup_cpu": round(base_cpu / statistics.median(cpu[name]), 2),
            "psnr_db": round(float(psnr(outs[name], outs["baseline"])), 2),
            "skipped_steps": s.get("skipped", 0),
            "token_pruned_steps": len(s.get("token_pruned_steps", [])),
            "token_kept_share": s.get("token_kept_share"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"size": args.size, "steps": args.steps, "acc_range": rng, "trained": trained, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
