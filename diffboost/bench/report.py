"""Write a :class:`~diffboost.bench.runner.BenchReport` as CSV, Markdown and a Pareto plot."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from .runner import BenchReport, ConfigResult

logger = logging.getLogger(__name__)

COLUMNS = (
    "name", "kind", "status", "time_s", "time_min_s", "time_max_s", "speedup", "denoiser_gflops", "flops_reduction",
    "psnr", "psnr_min", "ssim", "feature_distance", "frechet", "adherence", "description",
)


def _row(r: ConfigResult) -> dict[str, object]:
    return {
        "name": r.name,
        "kind": r.kind,
        "status": r.status,
        "time_s": r.time_s,
        "time_min_s": min(r.times_s) if r.times_s else math.nan,
        "time_max_s": max(r.times_s) if r.times_s else math.nan,
        "speedup": r.speedup,
        "denoiser_gflops": r.denoiser_flops / 1e9,
        "flops_reduction": r.flops_reduction,
        "psnr": r.psnr,
        "psnr_min": r.psnr_min,
        "ssim": r.ssim,
        "feature_distance": r.feature_distance,
        "frechet": r.frechet,
        "adherence": r.adherence,
        "description": r.description,
    }


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (0 < abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def write_csv(report: BenchReport, path: Path) -> Path:
    """One row per configuration; NaN means 'not measured' (see the status column)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in report.results:
            writer.writerow(_row(r))
    return path


def markdown(report: BenchReport) -> str:
    """The results table plus workload and notes, as Markdown."""
    s = report.settings
    lines = [
        f"Model: `{report.model}`, {report.size[0]}x{report.size[1]} px, {s.steps} steps, "
        f"{len(report.prompts)} prompts x {len(report.seeds)} seeds"
        + (f" x {s.images_per_prompt} images per call" if s.images_per_prompt > 1 else "")
        + f", median of {s.repeats} repeat(s).",
        "",
        f"Time: seconds per image (batch {s.images_per_prompt}: call time / images per call), median over repeats (min/max per repeat in results.csv); each "
        "config gets one untimed warm-up call (its FLOP-counted run) and configs are interleaved, "
        "rotating the order every repeat. FLOPs: denoiser forward passes only, one run (first prompt "
        "and seed). PSNR / SSIM / feature distance: vs the baseline image of the same prompt and seed "
        "(PSNR of the mean MSE over all images; psnr_min: worst image).",
        "",
        "| config | kind | s/img | speedup | denoiser GFLOPs | FLOPs red. | PSNR | PSNR min | SSIM "
        "| feat. dist | Fréchet | adherence | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        row = _row(r)
        cells = [f"`{r.name}`", r.kind] + [
            _fmt(row[k]) for k in ("time_s", "speedup", "denoiser_gflops", "flops_reduction", "psnr", "psnr_min",
                                   "ssim", "feature_distance", "frechet", "adherence")
        ] + [r.status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Configurations:", ""] + [f"- `{r.name}`: {r.description}" for r in report.results]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_plot(report: BenchReport, path: Path) -> Path | None:
    """Pareto plot, speedup vs PSNR (one point per config, rivals in another colour); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: Pareto plot skipped (pip install matplotlib)")
        return None
    points = [r for r in report.results if r.ok and r.kind != "baseline" and not math.isnan(r.speedup)]
    cap = 60.0  # PSNR above 60 dB (identical outputs: inf) is drawn at 60: visually indistinguishable
    fig, ax = plt.subplots(figsize=(7, 5))
    for rival, colour, label in ((False, "tab:blue", "diffboost"), (True, "tab:red", "rivals")):
        group = [r for r in points if r.is_rival == rival]
        ys = [min(r.psnr, cap) for r in group]
        ax.scatter([r.speedup for r in group], ys, c=colour, label=label, zorder=3)
        for r, y in zip(group, ys):
            ax.annotate(r.name, (r.speedup, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup vs baseline (wall time)")
    ax.set_ylabel(f"PSNR vs baseline [dB] (>= {cap:.0f} and identical drawn at {cap:.0f})")
    ax.set_title(f"{Path(report.model).name}: {report.settings.steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(report: BenchReport, out: Path) -> dict[str, Path]:
    """Write results.csv, results.md and pareto.png (if matplotlib) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_csv(report, out / "results.csv")}
    (out / "results.md").write_text(markdown(report))
    files["md"] = out / "results.md"
    plot = write_plot(report, out / "pareto.png")
    if plot is not None:
        files["png"] = plot
    return files
