"""The speed-fidelity front of a ``diffboost bench`` run: at each PSNR level, the fastest diffboost
configuration and the fastest rival configuration that reach it, their ratio, and each preset's
place on the ladder.

    python benchmarks/front.py benchmarks/results/front-flux-shapes/results.csv [--levels 30 38 45]

Prints a Markdown table (for benchmarks/RESULTS.md). Reads only the bench's CSV: every number comes
from one bench run (same machine, rivals in the same run). Also reports, for each diffboost row, the
hot-path efficiency: the speedup measured over the best a cache computing that share of the
denoiser's FLOPs could reach, T_base / (T_fixed + (T_base - T_fixed) / FLOPs reduction), where
T_fixed, the time outside the denoiser, is given with --fixed-share (measured by
benchmarks/flux_call_cost.py) or left out.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

RIVALS = ("diffusers", "cache-dit", "tomesd", "deepcache")
LEVELS = (30.0, 38.0, 45.0)
PRESET_LEVELS = {"safe": 45.0, "fast": 38.0, "turbo": 30.0}


def read(path: Path) -> list[dict]:
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["status"] != "ok":
                continue
            for key in ("speedup", "psnr", "flops_reduction", "time_s"):
                row[key] = float(row[key])
            rows.append(row)
    return rows


def fastest(rows: list[dict], level: float, kinds: tuple[str, ...]) -> dict | None:
    ok = [r for r in rows if r["kind"] in kinds and r["psnr"] >= level and r["kind"] != "baseline"]
    return max(ok, key=lambda r: r["speedup"], default=None)


def limit(row: dict, fixed_share: float) -> float:
    """The speedup a cache with this FLOPs reduction reaches at zero overhead."""
    return 1.0 / (fixed_share + (1.0 - fixed_share) / row["flops_reduction"])


def front_table(rows: list[dict], levels: tuple[float, ...] = LEVELS) -> str:
    out = ["| level | fastest diffboost | speedup | PSNR | fastest rival | speedup | PSNR | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for level in levels:
        ours, theirs = fastest(rows, level, ("diffboost",)), fastest(rows, level, RIVALS)
        cells = [f">= {level:g} dB"]
        for r in (ours, theirs):
            cells += ["–", "–", "–"] if r is None else [f"`{r['name']}`", f"{r['speedup']:.2f}x", f"{r['psnr']:.1f}"]
        ratio = ours["speedup"] / theirs["speedup"] if ours and theirs else math.nan
        cells.append("–" if math.isnan(ratio) else f"**{ratio:.2f}x**")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def preset_table(rows: list[dict], fixed_share: float | None, prefix: str = "preset") -> str:
    """One line per preset level: the row named ``{prefix}-{preset}`` (``preset-fast``, or
    ``calibrated-fast`` for a stack fitted with ``diffboost calibrate``) against the best rival."""
    out = [f"| {prefix} | aims at | speedup | PSNR | within its level | best rival at its level | ratio |"
           + (" hot-path efficiency |" if fixed_share is not None else ""),
           "|---|---|---|---|---|---|---|" + ("---|" if fixed_share is not None else "")]
    for preset, level in PRESET_LEVELS.items():
        row = next((r for r in rows if r["name"] == f"{prefix}-{preset}"), None)
        if row is None:
            continue
        rival = fastest(rows, level, RIVALS)
        cells = [f"`{preset}`", f">= {level:g} dB", f"{row['speedup']:.2f}x", f"{row['psnr']:.1f}",
                 "yes" if row["psnr"] >= level else "**no**",
                 "–" if rival is None else f"`{rival['name']}` {rival['speedup']:.2f}x",
                 "–" if rival is None else f"{row['speedup'] / rival['speedup']:.2f}x"]
        if fixed_share is not None:
            cells.append(f"{row['speedup'] / limit(row, fixed_share):.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--fixed-share", type=float, default=None,
                   help="share of the baseline's time spent outside the denoiser (0-1)")
    args = p.parse_args()
    rows = read(args.csv)
    print(front_table(rows, tuple(args.levels)))
    print()
    print(preset_table(rows, args.fixed_share))
    if any(r["name"].startswith("calibrated-") for r in rows):
        print()
        print(preset_table(rows, args.fixed_share, "calibrated"))


if __name__ == "__main__":
    main()
