"""Throughput of ``diffboost batch``: one process, one process with ``--batch-size``, and ``torchrun``
with 2 ranks, on the same prompt rows and model, run one after another on this machine.

    python benchmarks/batch_scaling.py [--model assets/flux-shapes] [--rows 16] [--steps 8] [--out runs/batch-scaling]

Each configuration writes into its own fresh folder; the images per second are the summary line's
(images made / the slowest rank's wall time, model loading excluded) and the command's whole wall
time (loading included) is shown next to it. Prints a Markdown table (benchmarks/RESULTS.md, "Batch
at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [f"a {size} {color} {shape} at the {pos} on a {bg} background"
           for size, color, shape, pos, bg in [
               ("large", "red", "circle", "left", "white"), ("small", "blue", "square", "top", "gray"),
               ("large", "green", "triangle", "right", "black"), ("small", "yellow", "star", "center", "white"),
               ("large", "purple", "circle", "bottom", "gray"), ("small", "orange", "triangle", "left", "black"),
               ("large", "blue", "star", "top", "white"), ("small", "red", "square", "right", "gray")]]


def run(label: str, cmd: list[str], env: dict[str, str]) -> dict[str, object]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rate = re.search(r"([0-9.]+) images/s in all", proc.stdout)
    ranks = re.findall(r"rank (\d+): made (\d+).*?([0-9.]+) images/s", proc.stdout)
    return {"label": label, "images_per_s": float(rate.group(1)) if rate else float("nan"), "command_s": wall,
            "ranks": [(int(r), int(m), float(s)) for r, m, s in ranks], "stdout": proc.stdout}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded reference model)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/batch-scaling"))
    args = p.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rows = args.out / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}) + "\n"
                            for i in range(args.rows)))
    base = ["batch", str(rows), "--steps", str(args.steps), "--preset", "none", "--quiet"]
    if args.model:
        base += ["--model", args.model]
    cores = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    configs = [
        (f"1 process, {cores} threads", [sys.executable, "-m", "diffboost", *base, "--out", str(args.out / "p1")],
         {**env, "OMP_NUM_THREADS": str(cores)}),
        (f"1 process, {cores} threads, --batch-size 4",
         [sys.executable, "-m", "diffboost", *base, "--batch-size", "4", "--out", str(args.out / "p1b4")],
         {**env, "OMP_NUM_THREADS": str(cores)}),
        (f"torchrun 2 ranks x {max(1, cores // 2)} thread(s)",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "diffboost",
          *base, "--out", str(args.out / "r2")], {**env, "OMP_NUM_THREADS": str(max(1, cores // 2))}),
    ]
    results = [run(label, cmd, e) for label, cmd, e in configs]
    first = results[0]["images_per_s"]
    print(f"\n{args.rows} images, {args.steps} steps, {os.cpu_count()} CPU cores\n")
    print("| configuration | images/s (generation) | vs 1 process | whole command (s, loading included) | per rank |")
    print("|---|---|---|---|---|")
    for r in results:
        per_rank = "; ".join(f"rank {k}: {m} images, {s:.2f}/s" for k, m, s in r["ranks"]) or "-"
        print(f"| {r['label']} | {r['images_per_s']:.2f} | {r['images_per_s'] / first:.2f}x | {r['command_s']:.1f} | "
              f"{per_rank} |")
    (args.out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "stdout"}
                                                       for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
