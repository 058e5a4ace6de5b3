"""Token merging (ToMe for SD) and key/value downsampling (ToDo) against the plain SD pipeline and tomesd.

    OMP_NUM_THREADS=1 python benchmarks/token_merging.py [--size 512] [--steps 10] [--prompts 2]
        [--repeats 3] [--out benchmarks/results/token_merging.json]

Pipeline: ``assets/sd-shapes`` when the folder exists (``DiffusionPipeline.from_pretrained(path,
use_safetensors=True)``, its ``diffboost.json`` guidance scale), otherwise a random-init SD
pipeline from the test factories with a wider UNet laid out like SD 1.x (self-attention at the
full latent resolution, where token merging acts by default), run at ``--size`` px. On the
random-init pipeline only the timings mean anything: its images are noise-like, so PSNR there says
how much the output moved, not whether it is still good.

Configurations (all with the defaults of the methods, i.e. the highest-resolution blocks only):

- ``baseline``: the pipeline as is;
- ``tome-0.5`` / ``tome-0.75``: ``TokenMerging(ratio=...)`` (0.75 is the most 2x2 windows allow);
- ``todo-2``: ``TokenDownsampling(factor=2)``;
- ``tomesd-0.5``: ``tomesd.apply_patch(pipe, ratio=0.5)`` if tomesd imports, removed with
  ``tomesd.remove_patch`` after every image. tomesd 0.1.3 reads ``use_ada_layer_norm``,
  ``use_ada_layer_norm_zero`` and ``use_ada_layer_norm_single`` off the blocks, attributes newer
  diffusers dropped in favour of ``norm_type``: they are set from ``norm_type`` on the block
  instances for its run and deleted after.

Timings: every configuration runs every prompt in a round, configuration after configuration
(interleaved, so drift of the shared machine hits all alike); wall time is the median over
``--repeats`` rounds, CPU time the process time of the same runs; one warm-up image per
configuration first. Fidelity: PSNR of the decoded images against the baseline's, over all prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import diffboost  # noqa: E402
from diffboost import TokenDownsampling, TokenMerging  # noqa: E402
from diffboost_reference.evaluation.metrics import psnr  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def load(size: int, seed: int = 0) -> tuple[Any, dict, bool]:
    """(pipe, call defaults, trained?)."""
    path = ROOT / "assets" / "sd-shapes"
    if path.exists():
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        cfg = path / "diffboost.json"
        defaults = json.loads(cfg.read_text()) if cfg.exists() else {}
        defaults = {k: v for k, v in defaults.items() if k == "guidance_scale"}
        return pipe, dict(defaults, height=size, width=size), True
    from diffusers import UNet2DConditionModel

    from factories import make_sd

    pipe = make_sd(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()
    return pipe, {"height": size, "width": size, "guidance_scale": 7.5}, False


class _Tomesd:
    """tomesd on the same pipeline object, undone after each image."""

    def __init__(self, ratio: float):
        import tomesd

        self.tomesd, self.ratio = tomesd, ratio

    def __call__(self, pipe: Any) -> Callable[[], None]:
        blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        added = []
        for b in blocks:  # the flags tomesd 0.1.3 reads; diffusers >= 0.25 only keeps norm_type
            for flag, kind in (
                ("use_ada_layer_norm", "ada_norm"),
                ("use_ada_layer_norm_zero", "ada_norm_zero"),
                ("use_ada_layer_norm_single", "ada_norm_single"),
            ):
                if flag not in vars(b):
                    setattr(b, flag, b.norm_type == kind)
                    added.append((b, flag))
        self.tomesd.apply_patch(pipe, ratio=self.ratio)

        def undo() -> None:
            self.tomesd.remove_patch(pipe)
            for b, flag in added:
                delattr(b, flag)

        return undo


def configs() -> dict[str, Callable[[Any], Callable[[], None]] | None]:
    out: dict[str, Callable[[Any], Callable[[], None]] | None] = {"baseline": None}
    for name, plugin in (
        ("tome-0.5", TokenMerging(ratio=0.5)),
        ("tome-0.75", TokenMerging(ratio=0.75)),
        ("todo-2", TokenDownsampling(factor=2)),
    ):
        out[name] = lambda pipe, p=plugin: (diffboost.apply(pipe, p), lambda: diffboost.remove(pipe))[1]
    try:
        out["tomesd-0.5"] = _Tomesd(0.5)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        print(f"tomesd not available ({exc}); its row is left out", file=sys.stderr)
    return out


def generate(pipe: Any, prompt: str, steps: int, defaults: dict, seed: int) -> tuple[torch.Tensor, float, float]:
    kw = dict(defaults, prompt=prompt, num_inference_steps=steps, output_type="pt")
    kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    w, c = time.perf_counter(), time.process_time()
    img = pipe(**kw).images
    return img.float().clamp(0, 1), time.perf_counter() - w, time.process_time() - c


def run_config(pipe: Any, install: Any, prompt: str, steps: int, defaults: dict, seed: int):
    undo = install(pipe) if install is not None else None
    try:
        return generate(pipe, prompt, steps, defaults, seed)
    finally:
        if undo is not None:
            undo()


def bench(size: int, steps: int, prompts: list[str], repeats: int) -> dict:
    pipe, defaults, trained = load(size)
    table = configs()
    errors: dict[str, str] = {}
    for name, install in list(table.items()):  # warm-up, and drop a rival that fails on this pipeline
        try:
            run_config(pipe, install, prompts[0], min(steps, 2), defaults, 0)
        except Exception as exc:  # noqa: BLE001 - reported in the results
            errors[name] = f"{type(exc).__name__}: {exc}"
            del table[name]
            print(f"{name} failed and is left out: {errors[name]}", file=sys.stderr)
    walls: dict[str, list[float]] = {k: [] for k in table}
    cpus: dict[str, list[float]] = {k: [] for k in table}
    images: dict[str, list[torch.Tensor]] = {}
    for _ in range(repeats):
        for name, install in table.items():
            wall = cpu = 0.0
            outs = []
            for i, p in enumerate(prompts):
                img, w, c = run_config(pipe, install, p, steps, defaults, seed=i)
                wall, cpu = wall + w, cpu + c
                outs.append(img)
            walls[name].append(wall)
            cpus[name].append(cpu)
            images[name] = outs
    base_wall = statistics.median(walls["baseline"])
    base = torch.cat(images["baseline"])
    rows = {}
    for name in table:
        rows[name] = {
            "wall_s": statistics.median(walls[name]),
            "wall_min_max": (min(walls[name]), max(walls[name])),
            "cpu_s": statistics.median(cpus[name]),
            "speedup": base_wall / statistics.median(walls[name]),
            "speedup_cpu": statistics.median(cpus["baseline"]) / statistics.median(cpus[name]),
            "psnr_db": float(psnr(torch.cat(images[name]), base)) if name != "baseline" else float("inf"),
        }
    return {
        "trained": trained, "size": size, "steps": steps, "prompts": len(prompts), "repeats": repeats,
        "rows": rows, "errors": errors,
    }


def markdown(res: dict) -> str:
    note = "" if res["trained"] else " (random-init pipeline: PSNR only says how far the output moved)"
    lines = [
        f"**sd**, {res['size']}x{res['size']} px, {res['steps']} steps, {res['prompts']} prompts per round, "
        f"median of {res['repeats']} rounds{note}",
        "",
        "| config | wall s (median) | min-max | CPU s | speedup (wall) | speedup (CPU) | PSNR dB vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lo, hi = r["wall_min_max"]
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {lo:.2f}-{hi:.2f} | {r['cpu_s']:.2f} | {r['speedup']:.2f}x "
            f"| {r['speedup_cpu']:.2f}x | {r['psnr_db']:.2f} |"
        )
    for name, err in res["errors"].items():
        lines.append(f"\n{name} failed on this pipeline and was left out: `{err}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    res = bench(args.size, args.steps, PROMPTS[: args.prompts], args.repeats)
    print(markdown(res), flush=True)
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
