"""Issue #24: where the time of a distilled student goes: denoiser vs fixed costs.

The teacher pipeline (its own steps and guidance) and the same pipeline with ``OneStep(student,
steps=N)`` generate the same prompts and seeds, interleaved, in one process. For every call the
time inside the denoiser's forward (torch forward hooks, perf_counter) is summed; the rest of the
call (text encoders, VAE decode, pipeline Python) is the fixed cost. A student's wall-clock speedup
is capped at T_teacher / T_fixed however fast its denoiser is.

    OMP_NUM_THREADS=1 python benchmarks/onestep.py --teacher assets/flux-shapes \\
        --student reflow=assets/flux-shapes-1step --steps 1 4 --prompts 16 --repeats 3 \\
        --out benchmarks/results/onestep-time
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import diffboost
from diffboost.generation import default_call_kwargs, load_pipeline, model_defaults


def _timed(pipe, prompt: str, seed: int, kwargs: dict) -> tuple[float, float]:
    spent = [0.0]
    starts: list[float] = []
    module = pipe.transformer
    pre = module.register_forward_pre_hook(lambda *a: starts.append(time.perf_counter()))
    post = module.register_forward_hook(lambda *a: spent.__setitem__(0, spent[0] + time.perf_counter() - starts.pop()))
    try:
        t0 = time.perf_counter()
        pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pil", **kwargs)
        total = time.perf_counter() - t0
    finally:
        pre.remove()
        post.remove()
    return total, spent[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="assets/flux-shapes")
    p.add_argument("--student", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-seed", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/onestep-time")
    args = p.parse_args()
    from diffboost_reference.data.scenes import benchmark_prompts

    teacher = Path(args.teacher)
    pipe = load_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    defaults = model_defaults(teacher)
    kwargs = default_call_kwargs(pipe, defaults)
    teacher_steps = int(defaults.get("steps", 28))
    rows = {"teacher": (None, teacher_steps)}
    for spec in args.student:
        name, path = spec.split("=", 1)
        for n in args.steps:
            rows[f"{name}-{n}step"] = (diffboost.OneStep(path, steps=n), n)
    prompts = benchmark_prompts(args.prompts, seed=args.prompt_seed)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    _timed(pipe, prompts[0], 0, dict(kwargs, num_inference_steps=2))  # warm-up
    for r in range(args.repeats):
        for name, (plugin, steps) in rows.items():  # interleaved: every row sees the same machine state
            if plugin is not None:
                diffboost.apply(pipe, plugin)
            try:
                for i, prompt in enumerate(prompts):
                    times[name].append(_timed(pipe, prompt, i, dict(kwargs, num_inference_steps=steps)))
            finally:
                if plugin is not None:
                    diffboost.remove(pipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"teacher": str(teacher), "teacher_steps": teacher_steps, "call_kwargs": dict(kwargs),
              "prompts": args.prompts, "repeats": args.repeats, "threads": torch.get_num_threads(), "rows": {}}
    base_total = statistics.median(t for t, _ in times["teacher"])
    base_den = statistics.median(d for _, d in times["teacher"])
    lines = ["| configuration | s / image | denoiser s / image | fixed s / image | speedup | denoiser time saved |",
             "|---|---|---|---|---|---|"]
    for name, vals in times.items():
        total = statistics.median(t for t, _ in vals)
        den = statistics.median(d for _, d in vals)
        row = {"total_s": total, "denoiser_s": den, "fixed_s": total - den, "speedup": base_total / total,
               "denoiser_speedup": base_den / den if den else float("inf")}
        result["rows"][name] = row
        lines.append(f"| {name} | {total:.4f} | {den:.4f} | {total - den:.4f} | {row['speedup']:.2f}x | "
                     f"{row['denoiser_speedup']:.1f}x |")
    fixed = result["rows"]["teacher"]["fixed_s"]
    result["cap"] = base_total / fixed
    lines.append("")
    lines.append(f"teacher: {base_total:.4f} s per image, {base_den:.4f} s in the denoiser, fixed {fixed:.4f} s: "
                 f"no student can be more than {result['cap']:.1f}x faster end to end at this size")
    (out / "onestep-time.json").write_text(json.dumps(result, indent=1))
    (out / "onestep-time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
