"""Hook overhead and raw speedup on a random-init Flux-architecture pipeline.

    python benchmarks/overhead.py [--tokens 1024] [--steps 20] [--repeats 5] [--out benchmarks/results/overhead.md]

- *Overhead*: every diffboost cache installed but configured never to skip (interval 1 / threshold 0 /
  tolerance 0) against the unpatched pipeline: the cost of the hooks themselves.
- *Speed*: skipping configurations: wall-clock speedup and the transformer FLOPs actually executed
  (counted with torch.utils.flop_counter over a whole pipeline call with latent output: the tiny text
  encoders add well under 1%; no VAE decode).

CPU time of the process is reported next to wall time: with one thread it is far less sensitive to
other processes on the machine than wall time. Runs are interleaved (baseline, config A, config B, ..., repeated) in one process and the median is
reported, so that drift of the machine affects every configuration alike. Random-init models give
near-flat images, so fidelity numbers here mean little: judge fidelity with `diffboost bench` on the
trained reference model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import diffboost  # noqa: E402
from diffboost import AdaptiveBlockCache, EasyCache, ErrorControlledCache, TaylorSeer  # noqa: E402


def build_pipeline(tokens: int, dim_heads: int, heads: int, double: int, single: int):
    """A FluxPipeline whose transformer is Flux-shaped at ``tokens`` image tokens (tiny text/VAE)."""
    from factories import make_flux_wide

    pipe = make_flux_wide(0, double=double, single=single, heads=heads, head_dim=dim_heads)
    side = int(round((tokens) ** 0.5)) * 2 * pipe.vae_scale_factor  # 2x2 packing
    return pipe, side


def call(pipe, side: int, steps: int):
    with torch.no_grad():
        return pipe(
            prompt="a red circle",
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=16,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(0),
        ).images


def count_flops(pipe, side: int, steps: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call(pipe, side, steps)
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens (default 1024 = 32x32 packed)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per call (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (default 2)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run the baseline and only these configurations (names as in the table)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    never_skip = {
        "TaylorSeer(interval=1)": TaylorSeer(interval=1),
        "TaylorSeer(interval=1, granularity='block')": TaylorSeer(interval=1, granularity="block"),
        "TaylorSeer(interval=1, lite=True)": TaylorSeer(interval=1, lite=True),
        "AdaptiveBlockCache(threshold=0)": AdaptiveBlockCache(threshold=0.0),
        "ErrorControlledCache(tolerance=0)": ErrorControlledCache(tolerance=0.0),
        # the criterion runs every step after the warm-up (one reduction and one sync), never caching
        "EasyCache(threshold=0)": EasyCache(threshold=0.0),
    }
    skipping = {
        "TaylorSeer(interval=3)": TaylorSeer(interval=3, warmup=3),
        "TaylorSeer(interval=5)": TaylorSeer(interval=5, warmup=3),
        "TaylorSeer(interval=5, lite=True)": TaylorSeer(interval=5, warmup=3, lite=True),
        "AdaptiveBlockCache(threshold=0.2, taylor_order=1)": AdaptiveBlockCache(threshold=0.2, taylor_order=1),
        "ErrorControlledCache(tolerance=0.1)": ErrorControlledCache(tolerance=0.1),
        "EasyCache(threshold=0.2, order=0) (preset fast)": EasyCache(threshold=0.2, order=0),
    }
    configs = {"baseline": None, **never_skip, **skipping}
    if args.only:
        unknown = [name for name in args.only if name not in configs]
        if unknown:
            parser.error(f"unknown configurations {unknown}; known: {list(configs)}")
        configs = {name: configs[name] for name in ["baseline", *args.only]}
    pipe, side = build_pipeline(args.tokens, args.head_dim, args.heads, args.double, args.single)
    pipe.set_progress_bar_config(disable=True)

    call(pipe, side, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, plugin in configs.items():
            if plugin is not None:
                diffboost.apply(pipe, plugin)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = call(pipe, side, args.steps)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if plugin is not None:
                diffboost.remove(pipe)
            outputs[name] = out
    flops = {}
    for name, plugin in configs.items():
        if plugin is not None:
            diffboost.apply(pipe, plugin)
        flops[name] = count_flops(pipe, side, args.steps)
        if plugin is not None:
            diffboost.remove(pipe)

    base_t = statistics.median(times["baseline"])
    base_c = statistics.median(cpu["baseline"])
    base_f = flops["baseline"]
    params = sum(p.numel() for p in pipe.transformer.parameters())
    lines = [
        f"Random-init Flux-architecture transformer: {args.double} double + {args.single} single blocks, "
        f"{args.heads}x{args.head_dim} heads, {params / 1e6:.1f}M parameters, {args.tokens} image tokens + 16 text tokens, "
        f"{args.steps} steps, median of {args.repeats} interleaved repeats; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs.",
        "",
        "| configuration | wall s | wall vs baseline | CPU s | CPU time vs baseline | TFLOPs per call | FLOPs reduction | max abs diff of latents |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in configs:
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        diff = (outputs[name] - outputs["baseline"]).abs().max().item()
        lines.append(
            f"| {name} | {t:.3f} | {(t / base_t - 1) * 100:+.1f}% ({base_t / t:.2f}x) | {c:.3f} | "
            f"{(c / base_c - 1) * 100:+.1f}% ({base_c / c:.2f}x) | "
            f"{flops[name] / 1e12:.3f} | {base_f / flops[name]:.2f}x | {diff:.2e} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
