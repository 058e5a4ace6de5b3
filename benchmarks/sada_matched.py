"""Add fixed-skip rows with the same number of evaluations as each SADA row of a bench config file.

    python benchmarks/sada_matched.py --model assets/flux-shapes --configs benchmarks/configs/sada-flux.toml \
        --prompts 16 --seeds 2 --out runs/sada-flux-matched.toml [--scheduler DPMSolverMultistepScheduler]

For every ``diffboost`` config whose only plugin is a criterion-driven ``SADA``, the pipeline runs
the bench's own workload (same prompts, seeds, size and call arguments as ``diffboost bench`` with
these options) and counts the steps SADA skipped; the output file holds the input configs plus, after
each such row, ``fixed-<name>``: SADA with the same approximations on a fixed schedule that skips the
rounded mean count, evenly spread over the same ``acc_range`` (never two adjacent when avoidable),
and with ``--fixed-range START END`` also ``fixed-late-<name>``: the same count spread over a range
chosen by hand (e.g. one that avoids the first steps, where extrapolation is worst). Run the bench on the output file: both rows are then measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import diffboost
from diffboost.bench import BenchSettings, load_configs, prepare_workload
from diffboost.bench.cli import model_call_defaults
from diffboost.bench.configs import build_plugins


def fixed_schedule(start: int, end: int, count: int) -> list[int]:
    """``count`` step indices evenly spread over [start, end)."""
    if count <= 0:
        return []
    span = end - start
    return sorted({start + int((i + 0.5) * span / count) for i in range(count)})


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def _entry(config) -> str:
    lines = ["[[config]]", f"name = {_toml_value(config.name)}", f"kind = {_toml_value(config.kind)}"]
    if config.plugins:
        specs = []
        for spec in config.plugins:
            args = "".join(f", {k} = {_toml_value(v)}" for k, v in spec.kwargs.items())
            specs.append(f'{{ plugin = "{spec.plugin}"{args} }}')
        lines.append(f"plugins = [{', '.join(specs)}]")
    if config.preset:
        lines.append(f"preset = {_toml_value(config.preset)}")
    if config.cache:
        lines.append(f"cache = {_toml_value(config.cache)}")
    for key in ("options", "calibrator"):
        value = getattr(config, key)
        if value:
            lines.append(f"{key} = {{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--configs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--fixed-range", type=int, nargs=2, default=None, metavar=("START", "END"),
                    help="also add fixed-late-<name>: the same count evenly spread over [START, END) "
                         "(a fixed schedule that avoids the steps where extrapolation is worst)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    configs = load_configs(args.configs)
    settings = BenchSettings(prompts=args.prompts, seeds=args.seeds, steps=args.steps, scheduler=args.scheduler,
                             call_kwargs=model_call_defaults(args.model), progress=False)
    runner = prepare_workload(args.model, settings)
    pipe = runner.pipe
    entries = []
    for config in configs:
        entries.append(_entry(config))
        sada = [s for s in config.plugins if s.plugin == "SADA"]
        if config.kind != "diffboost" or len(config.plugins) != 1 or not sada or "schedule" in sada[0].kwargs:
            continue
        plugin = build_plugins(config)[0]
        skipped = []
        with diffboost.accelerated(pipe, plugin):
            for prompt, seed in runner.jobs:
                runner.call(prompt, seed)
                skipped.append(diffboost.describe(pipe)["last_call"][0]["skipped"])
        count = round(statistics.mean(skipped))
        schedule = fixed_schedule(*plugin.acc_range, count)
        print(f"{config.name}: SADA skipped {statistics.mean(skipped):.2f} steps per call "
              f"(min {min(skipped)}, max {max(skipped)}) -> fixed schedule {schedule}", flush=True)
        # the fixed row keeps the approximations (lagrange_*) and drops what only the criterion reads
        kwargs = {k: v for k, v in sada[0].kwargs.items() if k not in ("max_consecutive_skips", "criterion", "tolerance")}
        kwargs["schedule"] = schedule
        fixed = type(config)(name=f"fixed-{config.name}", kind="diffboost",
                             plugins=(type(sada[0])("SADA", kwargs),))
        entries.append(_entry(fixed))
        if args.fixed_range:
            late = fixed_schedule(*args.fixed_range, count)
            print(f"  fixed-late-{config.name}: {late}", flush=True)
            kwargs = {**kwargs, "schedule": late}
            entries.append(_entry(type(config)(name=f"fixed-late-{config.name}", kind="diffboost",
                                               plugins=(type(sada[0])("SADA", kwargs),))))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# generated by benchmarks/sada_matched.py from {args.configs} on {args.model}\n\n"
    args.out.write_text(header + "\n\n".join(entries) + "\n")
    load_configs(args.out)  # the written file parses and validates
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
