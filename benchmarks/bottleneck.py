"""Bottleneck sampling: wall and CPU time against the plain pipeline, alone and with TaylorSeer.

    OMP_NUM_THREADS=1 python benchmarks/bottleneck.py [--model assets/flux-shapes] [--repeats 5]
        [--prompts 8] [--steps N] [--size PX] [--device cpu]

Configurations (one process, runs interleaved config by config and repeated; the median is
reported so that machine drift hits every configuration alike):

- ``baseline``: the pipeline as is;
- ``bottleneck``: ``BottleneckSampling()`` (stages 1.0/0.5/1.0 with 20/60/20 % of the steps);
- ``bottleneck-lean``: stages 1.0/0.5/1.0 with 10/70/20 % of the steps;
- ``bottleneck+taylorseer``: ``BottleneckSampling()`` stacked with ``TaylorSeer(interval=3, warmup=1)``.

With the trained reference model (``--model``, default ``assets/flux-shapes`` when it exists) the
script also reports prompt adherence (evaluator attributes all match the prompt), the Fréchet
distance of evaluator embeddings to the baseline's images, and PSNR / SSIM to the baseline images.
Bottleneck sampling changes pixels far more than caching (the middle steps run at another
resolution), so PSNR/SSIM are low by design: adherence and Fréchet distance are the fair measures.

Without the model it falls back to a random-init Flux-architecture pipeline (wider transformer than
the test factory, tiny text encoders) at ``--size`` pixels with ``output_type="latent"`` (VAE
excluded): only the timings mean anything there.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import diffboost  # noqa: E402
from diffboost import BottleneckSampling, TaylorSeer  # noqa: E402

CONFIGS = {
    "baseline": (),
    "bottleneck": (BottleneckSampling(),),
    "bottleneck-lean": (BottleneckSampling(stages=((1.0, 0.1), (0.5, 0.7), (1.0, 0.2))),),
    "bottleneck+taylorseer": (BottleneckSampling(), TaylorSeer(interval=3, warmup=1)),
}


def random_flux(seed: int = 0):
    """The factory's tiny Flux pipeline with a wider transformer (4 heads x 32, 2 double + 4 single)."""
    from factories import make_flux_wide

    return make_flux_wide(seed)


def load(args: argparse.Namespace):
    """(pipe, call kwargs, trained?)"""
    model = Path(args.model)
    if (model / "model_index.json").is_file():
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(model), use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        from diffboost.cli import default_call_kwargs, model_defaults

        # the size and text length the model was trained for (as `diffboost generate` uses them)
        kwargs = {"num_inference_steps": 28, **default_call_kwargs(pipe, model_defaults(model))}
        kwargs["output_type"] = "pt"
        trained = True
    else:
        pipe = random_flux()
        size = args.size
        kwargs = dict(height=size, width=size, num_inference_steps=28, guidance_scale=3.5,
                      max_sequence_length=8, output_type="latent")
        trained = False
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    return pipe.to(args.device), kwargs, trained


def generate(pipe, prompts: list[str], kwargs: dict, device: str) -> tuple[torch.Tensor, float, float]:
    """One pipeline call per prompt (seed = prompt index); returns outputs, wall s, CPU s."""
    outs = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i, prompt in enumerate(prompts):
        gen = torch.Generator("cpu").manual_seed(i)
        with torch.no_grad():
            out = pipe(prompt=prompt, generator=gen, **kwargs)
        outs.append(out.images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat([o.float().cpu() for o in outs]), time.perf_counter() - wall0, time.process_time() - cpu0


def quality(images: dict[str, torch.Tensor], prompts: list[str]) -> dict[str, dict[str, float]]:
    from diffboost_reference.evaluation.metrics import embeddings, frechet_distance, prompt_adherence, psnr, ssim

    base = images["baseline"]
    ref = embeddings(base)
    out = {}
    for name, img in images.items():
        out[name] = {
            "adherence": prompt_adherence(img, prompts),
            "frechet_to_baseline": frechet_distance(embeddings(img), ref),
            "psnr": float(psnr(img, base)) if name != "baseline" else float("inf"),
            "ssim": float(ssim(img, base)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "assets" / "flux-shapes"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per timed run (trained model only)")
    ap.add_argument("--steps", type=int, default=0, help="override num_inference_steps")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (random-init model only)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    pipe, kwargs, trained = load(args)
    from diffboost_reference.data.scenes import benchmark_prompts

    prompts = benchmark_prompts(args.prompts) if trained else ["a red circle"]
    print(f"model: {'trained ' + args.model if trained else 'random-init Flux (timings only)'}; "
          f"call: {kwargs}; prompts per run: {len(prompts)}; torch threads: {torch.get_num_threads()}")

    walls = {name: [] for name in CONFIGS}
    cpus = {name: [] for name in CONFIGS}
    images: dict[str, torch.Tensor] = {}
    for name, plugins in CONFIGS.items():  # warm-up run of each configuration, untimed
        with diffboost.accelerated(pipe, *plugins) if plugins else _nothing():
            images[name], _, _ = generate(pipe, prompts, kwargs, args.device)
    for _ in range(args.repeats):
        for name, plugins in CONFIGS.items():
            with diffboost.accelerated(pipe, *plugins) if plugins else _nothing():
                _, wall, cpu = generate(pipe, prompts, kwargs, args.device)
            walls[name].append(wall)
            cpus[name].append(cpu)

    scores = quality(images, prompts) if trained else {}
    base_wall, base_cpu = statistics.median(walls["baseline"]), statistics.median(cpus["baseline"])
    print(f"\nmachine: {platform.processor() or platform.machine()}, device {args.device}, "
          f"{args.repeats} interleaved repeats\n")
    head = "| config | wall s (median) | speedup | CPU s (median) | CPU speedup |"
    cols = "|---|---|---|---|---|"
    if trained:
        head += " adherence | Fréchet to baseline | PSNR dB | SSIM |"
        cols += "---|---|---|---|"
    print(head)
    print(cols)
    for name in CONFIGS:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        row = f"| {name} | {w:.3f} | {base_wall / w:.2f}x | {c:.3f} | {base_cpu / c:.2f}x |"
        if trained:
            q = scores[name]
            row += f" {q['adherence']:.3f} | {q['frechet_to_baseline']:.3f} | {q['psnr']:.2f} | {q['ssim']:.3f} |"
        print(row)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
