"""``diffboost bench``: command-line front end (``add_arguments`` / ``run_from_args``).

Example::

    diffboost bench --model assets/flux-shapes --prompts 16 --seeds 2 --steps 28 --out runs/bench
    diffboost bench --quick --out runs/bench-quick
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from diffboost_reference.evaluation.classifier import DEFAULT_EVALUATOR_DIR

from .configs import ConfigError, default_configs, load_configs, quick_configs
from .report import markdown, write_all
from .runner import BenchSettings, run_bench

logger = logging.getLogger(__name__)

#: --quick overrides (CI smoke run).
QUICK = {"prompts": 2, "seeds": 1, "steps": 6, "repeats": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.add_argument("--model", type=Path, default=None,
                        help="local Diffusers pipeline folder (loaded with use_safetensors=True); default: the embedded "
                             "reference model (flux-shapes)")
    parser.add_argument("--configs", type=Path, default=None,
                        help="TOML/YAML file with the configurations to compare (schema: diffboost/bench/configs.py); "
                             "default: built-in list (baseline, each plugin at 2-3 settings, presets, rivals)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="output folder for results.csv, results.md and pareto.png; default: %(default)s")
    parser.add_argument("--prompts", type=int, default=None, help="number of benchmark prompts (default 8; quick: 2)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 2; quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; quick: 6)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed passes over all configs; time is the median (default 3; quick: 1)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: model's default sample size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: model's default sample size)")
    parser.add_argument("--call-kwargs", type=json.loads, default={},  # over the model's diffboost.json
                        help='extra pipeline call arguments as JSON, e.g. \'{"guidance_scale": 3.5}\' (over the model\'s diffboost.json)')
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed that picks the benchmark prompts (default 0)")
    parser.add_argument("--evaluator", type=Path, default=DEFAULT_EVALUATOR_DIR,
                        help="evaluator folder for feature/Fréchet distance and adherence; default: %(default)s")
    parser.add_argument("--no-evaluator", action="store_true", help="skip the evaluator-based metrics")
    parser.add_argument("--adherence", choices=("auto", "on", "off"), default="auto",
                        help="prompt adherence: auto = only for models whose tokenizer covers the scene captions")
    parser.add_argument("--device", default=None,
                        help="device to run on, e.g. cuda or cpu (default: where the pipeline loads, i.e. cpu)")
    parser.add_argument("--scheduler", default=None,
                        help="swap the pipeline's scheduler for this diffusers class, built from its config "
                        "(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    parser.add_argument("--dtype", default=None, help="cast the pipeline, e.g. bfloat16 (default: as saved)")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="images per pipeline call (num_images_per_prompt; default 1): > 1 times batched "
                        "calls, closer to the compute-bound regime of large models; s/img divides by it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted run")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI smoke mode: {QUICK} and a handful of configs (unless --configs is given)")
    parser.add_argument("--list-configs", action="store_true", help="print the configurations and exit")
    vlm = parser.add_argument_group("vision-language models (--vlm)")
    vlm.add_argument("--vlm", action="store_true",
                     help="benchmark the visual-token pruners on a LLaVA model (default: the shipped assets/llava-shapes)")
    vlm.add_argument("--methods", default=None, help="comma-separated pruners (default: HiPrune,HiRED,VisionZip,FastV,Downsample)")
    vlm.add_argument("--budgets", default=None, help="comma-separated shares of visual tokens kept (default 0.33,0.25,0.22,0.11)")
    vlm.add_argument("--questions", type=int, default=None, help="held-out questions for accuracy (default 512; quick: 16)")
    vlm.add_argument("--question-offset", type=int, default=100_000,
                     help="first seed of the question set (default %(default)s; the trainer monitors seeds 0..)")
    vlm.add_argument("--timed", type=int, default=16, help="questions timed one by one per repeat (default %(default)s)")
    vlm.add_argument("--timed-batch", type=int, default=1,
                     help="questions per timed generate call (default 1: latency; larger: the compute-bound regime)")
    vlm.add_argument("--decode-tokens", type=int, default=16, help="forced new tokens for decode speed (default %(default)s)")


def model_call_defaults(model: Path) -> dict:
    """Call arguments shipped with a model in ``diffboost.json`` (guidance settings it was evaluated
    with); ``--call-kwargs`` overrides them."""
    from diffboost.generation import CALL_DEFAULTS, model_defaults

    defaults = model_defaults(Path(model)) if Path(model).is_dir() else {}
    return {k: defaults[k] for k in CALL_DEFAULTS if k in defaults}


def model_size(model: Path) -> tuple[int | None, int | None]:
    """The image size shipped with a model in ``diffboost.json`` (``generate`` uses it too)."""
    from diffboost.generation import model_defaults

    defaults = model_defaults(Path(model)) if Path(model).is_dir() else {}
    height = defaults.get("height")
    return height, defaults.get("width", height)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Build :class:`BenchSettings` from parsed arguments (``--quick`` fills what was not given)."""
    defaults = QUICK if args.quick else {f: getattr(BenchSettings, f) for f in QUICK}
    pick = {f: getattr(args, f) if getattr(args, f) is not None else defaults[f] for f in QUICK}
    for field, value in {**pick, "images-per-prompt": args.images_per_prompt}.items():
        if value < 1:
            raise ValueError(f"--{field} must be >= 1, got {value}")
    shipped = model_size(args.model)  # --height/--width win; else the model's size, else its config's
    return BenchSettings(
        **pick,
        height=args.height or shipped[0],
        width=args.width or shipped[1],
        prompt_seed=args.prompt_seed,
        count_flops=not args.no_flops,
        evaluator=None if args.no_evaluator else args.evaluator,
        adherence=args.adherence,
        call_kwargs={**model_call_defaults(args.model), **dict(args.call_kwargs)},
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        images_per_prompt=args.images_per_prompt,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; return the process exit code."""
    if args.vlm:
        from .vlm import run_from_args as run_vlm

        return run_vlm(args)
    try:
        if args.model is None:
            from diffboost.generation import default_model_path

            args.model = default_model_path()
        configs = load_configs(args.configs) if args.configs else (quick_configs() if args.quick else default_configs())
        settings = settings_from_args(args)
    except (ConfigError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.list_configs:
        for c in configs:
            print(f"{c.name:28s} {c.kind:10s} {c.describe()}")
        return 0
    try:
        report = run_bench(args.model, configs, settings)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except RuntimeError as exc:  # the baseline itself failed: nothing to compare against
        logger.error("%s", exc)
        return 1
    files = write_all(report, args.out)
    print(markdown(report))
    for kind, path in files.items():
        logger.info("wrote %s: %s", kind, path)
    return 0 if all(not r.status.startswith("error") for r in report.results) else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m diffboost.bench``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="diffboost bench", description="Benchmark acceleration configs vs baseline.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
