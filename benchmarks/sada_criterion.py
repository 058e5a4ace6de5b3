"""Does SADA's skip criterion predict where skipping is safe? Measured on baseline trajectories.

    python benchmarks/sada_criterion.py --model assets/flux-shapes --prompts 8 --out benchmarks/results/sada-criterion

Runs the bench's workload (prompts, seeds, the model's shipped call arguments) without acceleration,
records every solver step's state y_n, sigma s_n and drift f_n (the model output the scheduler
receives: the velocity for flow matching, after CFG), and for every step n >= 3 measures

- ``err(n)``: the relative error ||f_hat_n - f_n|| / ||f_n|| of the extrapolation a skipped step n
  would use, f_hat_n = 2 f_{n-1} - f_{n-2} (what SADA and a fixed skip schedule both substitute), and
  ``state_err(n)`` = |s_{n+1} - s_n| ||f_hat_n - f_n|| / ||x0_n||, the displacement of the state (and
  so of the image) that skipping step n causes;
- what each criterion knew one step earlier (at n-1, when it decides on step n): the paper's sign
  rule ``mean(-(f_{n-1} - 2 f_{n-2} + f_{n-3})) <= 0`` and our curvature criterion's
  ``kappa = |s_{n-1} - s_{n-2}| ||f_{n-1} - 2 f_{n-2} + f_{n-3}|| / ||x0_{n-1}||``.

A useful criterion skips where the errors are small. Writes ``criterion.json`` (per-step means, the mean
error on steps the sign rule would skip vs keep, and the correlations) and prints a table.
Flow-matching schedulers only (the drift is the velocity the scheduler receives).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from diffboost.bench import BenchSettings, prepare_workload
from diffboost.bench.cli import model_call_defaults


def record_drifts(workload) -> list[list[tuple[float, torch.Tensor, torch.Tensor]]]:
    """Baseline (sigma, state, drift) per job and scheduler step, in order."""
    scheduler = workload.pipe.scheduler
    original = scheduler.step
    seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def step(model_output, timestep, sample, *args, **kwargs):
        sigma = float(scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else 0])
        seen.append((sigma, sample.detach().float().clone(), model_output.detach().float().clone()))
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step  # instance attribute, removed below
    try:
        runs = []
        for prompt, seed in workload.jobs:
            seen.clear()
            workload.call(prompt, seed, output_type="latent")
            runs.append(list(seen))
        return runs
    finally:
        del scheduler.step


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def analyse(runs: list[list[tuple[float, torch.Tensor, torch.Tensor]]]) -> dict:
    rows = []  # (n, err, state_err, sign_skip, kappa)
    for run in runs:
        s = [r[0] for r in run] + [0.0]  # the last step ends at sigma 0
        y, f = [r[1] for r in run], [r[2] for r in run]
        x0 = [y[n] - s[n] * f[n] for n in range(len(f))]
        for n in range(3, len(f)):
            miss = 2 * f[n - 1] - f[n - 2] - f[n]
            state_err = abs(s[n + 1] - s[n]) * float(miss.norm() / x0[n].norm())
            second = f[n - 1] - 2 * f[n - 2] + f[n - 3]
            kappa = abs(s[n - 1] - s[n - 2]) * float(second.norm() / x0[n - 1].norm())
            rows.append((n, float(miss.norm() / f[n].norm()), state_err, float((-second).mean()) <= 0.0, kappa))
    a = np.array(rows, dtype=float)
    per_step = []
    for n in sorted(set(a[:, 0].astype(int))):
        sel = a[a[:, 0] == n]
        per_step.append({"step": int(n), "err": float(sel[:, 1].mean()), "state_err": float(sel[:, 2].mean()),
                         "sign_skips": float(sel[:, 3].mean()), "kappa_before": float(sel[:, 4].mean())})
    skip, keep = a[a[:, 3] == 1], a[a[:, 3] == 0]
    return {
        "jobs": len(runs),
        "per_step": per_step,
        "sign_rule": {"skip_share": float(a[:, 3].mean()),
                      "err_where_skip": float(skip[:, 1].mean()), "err_where_keep": float(keep[:, 1].mean()),
                      "state_err_where_skip": float(skip[:, 2].mean()),
                      "state_err_where_keep": float(keep[:, 2].mean())},
        "corr_state_err_kappa": float(np.corrcoef(a[:, 2], a[:, 4])[0, 1]),
        "corr_state_err_sign": float(np.corrcoef(a[:, 2], a[:, 3])[0, 1]),
        "corr_err_sign": float(np.corrcoef(a[:, 1], a[:, 3])[0, 1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    settings = BenchSettings(prompts=args.prompts, seeds=args.seeds, steps=args.steps,
                             call_kwargs=model_call_defaults(args.model), progress=False)
    workload = prepare_workload(args.model, settings)
    result = {"model": str(args.model), "steps": args.steps, **analyse(record_drifts(workload))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "criterion.json").write_text(json.dumps(result, indent=1))
    print("step | err(n) | state_err(n) | share the sign rule skips | kappa known at n-1")
    for r in result["per_step"]:
        print(f"{r['step']} | {r['err']:.4f} | {r['state_err']:.5f} | {r['sign_skips']:.2f} | {r['kappa_before']:.5f}")
    s = result["sign_rule"]
    print(f"sign rule: skips {s['skip_share']:.0%} of steps; mean err where it skips {s['err_where_skip']:.4f}, "
          f"where it keeps {s['err_where_keep']:.4f}; state_err {s['state_err_where_skip']:.5f} vs "
          f"{s['state_err_where_keep']:.5f}")
    print(f"corr(state_err, kappa) = {result['corr_state_err_kappa']:.3f}; corr(state_err, sign says skip) = "
          f"{result['corr_state_err_sign']:.3f}; corr(err, sign says skip) = {result['corr_err_sign']:.3f}")


if __name__ == "__main__":
    main()
