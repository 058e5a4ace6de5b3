"""SADA (step-wise) against the plain pipeline and fixed step-skipping schedules with the same NFE.

    OMP_NUM_THREADS=1 python benchmarks/sada.py [--family flux|sd|both] [--steps 50] [--prompts 4]
        [--repeats 3] [--out benchmarks/results/sada.json]

Per family (``flux`` -> ``assets/flux-shapes``, ``sd`` -> ``assets/sd-shapes`` when the folder
exists, loaded with ``DiffusionPipeline.from_pretrained(path, use_safetensors=True)`` and its
``diffboost.json`` generation defaults; otherwise a random-init pipeline built from the test
factories with a wider denoiser, where only the timings mean anything) the configurations are:

- ``baseline``: the pipeline as is, ``--steps`` steps;
- ``sada``: ``SADA(acc_range=(round(0.2 N), round(0.94 N)))`` (the paper's (10, 47) at N = 50);
- ``fixed-skip``: SADA's approximations on a fixed schedule that skips as many steps as SADA did
  for that prompt, evenly spaced over the same range (same number of denoiser evaluations);
- ``fewer-steps``: the plain pipeline with ``num_inference_steps`` = SADA's evaluations.

Timings: wall-clock median over ``--repeats`` rounds; in a round every configuration runs every
prompt, configuration after configuration (interleaved, so machine drift hits all alike); CPU time
is the process time of the same runs. Fidelity: PSNR and SSIM of the decoded images against the
baseline's (``diffboost_reference.evaluation.metrics``), averaged over prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import diffboost  # noqa: E402
from diffboost import SADA  # noqa: E402
from diffboost_reference.evaluation.metrics import psnr, ssim  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sada_matched import fixed_schedule  # noqa: E402

PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow star",
    "a big red square", "a small blue circle", "a purple triangle", "an orange star",
]


def load(family: str, seed: int = 0):
    """(pipe, call defaults, trained?)."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    path = ROOT / "assets" / f"{family}-shapes"
    if path.exists():
        pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        from diffboost.cli import default_call_kwargs, model_defaults

        # the size and text length the model was trained for (as `diffboost generate` uses them)
        return pipe, default_call_kwargs(pipe, model_defaults(path)), True
    from factories import make_flux_wide, make_sd

    if family == "flux":
        pipe = make_flux_wide(seed)
        return pipe, {"height": 128, "width": 128, "max_sequence_length": 16}, False
    from diffusers import UNet2DConditionModel

    pipe = make_sd(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()
    # SD 2 style DPM++ 2M
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe, {"height": 128, "width": 128, "guidance_scale": 5.0}, False


def generate(pipe, prompt: str, steps: int, defaults: dict, seed: int) -> tuple[torch.Tensor, float, float]:
    kw = dict(defaults, prompt=prompt, num_inference_steps=steps, output_type="pt")
    kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    w, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        img = pipe(**kw).images
    return img.float().clamp(0, 1), time.perf_counter() - w, time.process_time() - c


def bench(family: str, steps: int, prompts: list[str], repeats: int) -> dict:
    pipe, defaults, trained = load(family)
    rng = (round(0.2 * steps), round(0.94 * steps))
    sada = SADA(acc_range=rng)
    # SADA's skip count per prompt decides the matched rivals
    skips = []
    with diffboost.accelerated(pipe, sada):
        for i, p in enumerate(prompts):
            generate(pipe, p, steps, defaults, seed=i)
            skips.append(diffboost.describe(pipe)["last_call"][0]["skipped"])
    configs = {
        "baseline": lambda i: ((), steps),
        "sada": lambda i: ((sada,), steps),
        "fixed-skip": lambda i: ((SADA(schedule=tuple(fixed_schedule(*rng, skips[i]))),), steps),
        "fewer-steps": lambda i: ((), steps - skips[i]),
    }
    walls = {k: [] for k in configs}
    cpus = {k: [] for k in configs}
    images: dict[str, list[torch.Tensor]] = {}
    for r in range(repeats):
        for name, make in configs.items():
            wall = cpu = 0.0
            outs = []
            for i, p in enumerate(prompts):
                plugins, n = make(i)
                if plugins:
                    diffboost.apply(pipe, *plugins)
                try:
                    img, w, c = generate(pipe, p, n, defaults, seed=i)
                finally:
                    diffboost.remove(pipe)
                wall, cpu = wall + w, cpu + c
                outs.append(img)
            walls[name].append(wall)
            cpus[name].append(cpu)
            images[name] = outs
    base_wall = statistics.median(walls["baseline"])
    rows = {}
    for name in configs:
        a, b = torch.cat(images[name]), torch.cat(images["baseline"])
        nfe = steps * len(prompts) - (0 if name == "baseline" else sum(skips))
        rows[name] = {
            "wall_s": statistics.median(walls[name]),
            "cpu_s": statistics.median(cpus[name]),
            "speedup": base_wall / statistics.median(walls[name]),
            "nfe_per_image": nfe / len(prompts),
            "psnr_db": float(psnr(a, b)) if name != "baseline" else float("inf"),
            "ssim": float(ssim(a, b)),
        }
    return {"family": family, "trained": trained, "steps": steps, "acc_range": rng, "skips": skips, "rows": rows}


def markdown(res: dict) -> str:
    note = "" if res["trained"] else " (random-init pipeline: fidelity is meaningless, timings only)"
    lines = [
        f"**{res['family']}**, {res['steps']} steps, acc_range {tuple(res['acc_range'])}{note}; SADA skipped "
        f"{res['skips']} steps per prompt",
        "",
        "| config | NFE/image | wall s (median) | CPU s | speedup | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lines.append(
            f"| {name} | {r['nfe_per_image']:.1f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['speedup']:.2f}x "
            f"| {r['psnr_db']:.2f} | {r['ssim']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="both", choices=("flux", "sd", "both"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    families = ("flux", "sd") if args.family == "both" else (args.family,)
    results = []
    for fam in families:
        res = bench(fam, args.steps, PROMPTS[: args.prompts], args.repeats)
        results.append(res)
        print(markdown(res), "\n", flush=True)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
