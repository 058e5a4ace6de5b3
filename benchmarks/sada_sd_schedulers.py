"""SADA on the SD reference model with DDIM, Euler and DPM++ at 12 steps (fidelity only).

    OMP_NUM_THREADS=1 python benchmarks/sada_sd_schedulers.py

Uses the workload of tests/test_reference_models.py (two prompts, seed 0, the model's diffboost.json
settings) and prints, per scheduler and SADA setting, the skipped steps and the PSNR against the
same scheduler's unaccelerated images.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import diffboost  # noqa: E402
from diffboost import SADA  # noqa: E402
from diffboost_reference.evaluation.metrics import psnr  # noqa: E402
from test_reference_models import SCHEDULERS, _load, _run  # noqa: E402

CONFIGS = (
    SADA(acc_range=(3, 11), lagrange_step=6),
    SADA(acc_range=(3, 11), max_consecutive_skips=2, lagrange_step=6),
    SADA(acc_range=(4, 11), max_consecutive_skips=1, lagrange_term=0),
)


def main() -> None:
    torch.set_num_threads(1)
    pipe, kwargs = _load("sd-shapes")
    original = pipe.scheduler
    print("| scheduler | acc_range | max_consecutive_skips | skipped steps | PSNR dB |\n|---|---|---|---|---|")
    for name in ("ddim", "euler", "dpm"):
        pipe.scheduler = SCHEDULERS[name].from_config(original.config)
        base = _run(pipe, kwargs)
        for cfg in CONFIGS:
            with diffboost.accelerated(pipe, cfg):
                out = _run(pipe, kwargs)
                stats = [s for s in diffboost.describe(pipe)["last_call"] if "skipped" in s][0]
            print(f"| {name} | {cfg.acc_range} | {cfg.max_consecutive_skips} | {stats['skipped_steps']} | "
                  f"{float(psnr(out, base)):.2f} |", flush=True)
    pipe.scheduler = original


if __name__ == "__main__":
    main()
