"""The ``diffboost`` command line.

    diffboost generate ["PROMPT"] [--model PATH] [--preset NAME|none | --plugins FILE] [--steps N] [--seed S] [--out FILE] [--compare]
    diffboost batch PROMPTS [--out DIR] [--model PATH] [--preset NAME|none | --plugins FILE] [--seeds N] [--steps N] [--batch-size N] ...
    torchrun --nproc-per-node N -m diffboost batch PROMPTS ...   (the rows shared across N processes)
    diffboost calibrate [--model PATH] [--preset NAME | --plugins FILE] [--also FILE] [--target DB] [--prompts FILE] [--out FILE.toml]
    diffboost distill [--teacher PATH] [--out PATH] [--method reflow|dmd] [--steps N] [--resume] [--device cpu|cuda]
    diffboost bench [--model PATH] [--quick] ...
    diffboost demo [--model PATH] [--host 127.0.0.1] [--port 7860]

``generate`` runs the embedded reference model (``assets/flux-shapes``) when ``--model`` is not given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .limits import (
    InputError,
    check_guidance,
    check_output_dir,
    check_output_file,
    check_seed,
    check_seed_range,
    check_size,
    check_stack_file,
    check_steps,
)

logger = logging.getLogger("diffboost")

from .generation import (  # noqa: F401  (re-exported: the command line's helpers live there)
    CALL_DEFAULTS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    call_counts,
    check_model_folder,
    default_call_kwargs,
    default_model_candidates,
    default_model_path,
    guidance_kwargs,
    guidance_setting,
    is_student,
    load_pipeline,
    model_defaults,
    save_image_atomic,
    student_of,
)
from .media import save_image
from .generation import generate_once as _generate_once


def check_settings(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """``--size``, ``--steps``, ``--seed``, ``--guidance`` against :mod:`diffboost.limits`, before loading."""
    native = defaults.get("height") if isinstance(defaults.get("height"), int) else None
    if args.size is not None:
        check_size(args.size, native, "--size")
    if args.steps is not None:
        check_steps(args.steps, "--steps")
    check_seed(args.seed, "--seed")
    if args.guidance is not None:
        check_guidance(args.guidance, "--guidance")


def _side_by_side(left: Any, right: Any) -> Any:
    from PIL import Image

    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def _side_file(out: Path) -> Path:
    return out.with_name(out.stem + "_compare" + out.suffix)


#: ``--preset onestep``: the distilled student next to the model (``MODEL-1step``, see ``diffboost distill``)
ONESTEP = "onestep"


def _preset_or_none(name: str) -> str | None:
    """``none`` (the plain pipeline), ``onestep`` or a known preset; an unknown name fails here, before any work."""
    from .plugins.presets import resolve

    if name == "none":
        return None
    if name == ONESTEP:
        return name
    try:
        resolve(name)
    except ValueError as err:
        raise ValueError(f"{err}, onestep (the distilled student next to the model), or none for the plain "
                         "pipeline") from None
    return name


def stack_from_args(args: argparse.Namespace, model: Path | None = None) -> tuple[list[Any] | None, str]:
    """The plugins to apply (None: the plain pipeline) and their label, from ``--plugins FILE`` or
    ``--preset NAME`` (default ``fast``; ``none`` for a distilled student, which has nothing to
    cache); checked before any work. The label of a file names it and a hash of its content, so
    that ``batch`` remakes images when the file changes."""
    import hashlib
    import json

    from .plugins.stacks import load, to_data

    if getattr(args, "plugins", None):
        stack = load(args.plugins)
        digest = hashlib.sha256(json.dumps(to_data(stack), sort_keys=True).encode()).hexdigest()[:8]
        return stack, f"{Path(args.plugins).name}#{digest}"
    name = args.preset
    if name is None:
        name = "none" if model is not None and is_student(model) else "fast"
        if name == "none":
            logger.info("%s is a distilled student: running it plain (a preset has little to reuse in a few "
                        "steps; --preset NAME to apply one anyway)", model)
    preset = _preset_or_none(name)
    if preset == ONESTEP:
        from .samplers.onestep import OneStep

        student = student_of(model) if model is not None else None
        if student is None:
            raise ValueError(f"--preset onestep: no distilled student next to {model} (a folder {model}-1step with "
                             f"distill.json); make one with: diffboost distill --teacher {model}")
        return [OneStep(str(student))], f"onestep:{student.name}"
    return ([preset] if preset else None), name


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    import diffboost

    # everything that can be wrong is checked before the model is loaded
    model = check_model_folder(args.model) if args.model else default_model_path()
    stack, label = stack_from_args(args, model)
    defaults = model_defaults(model)
    check_settings(args, defaults)
    from .prompt_files import pipeline_call_args

    call_args = pipeline_call_args(model) or set()
    if "num_frames" in call_args:
        return _generate_video(args, model, stack, label, defaults)
    if args.frames is not None:
        raise InputError(f"--frames: {model} makes images, not videos")
    out = check_output_file(args.out)
    if args.compare:
        check_output_file(_side_file(out))
    pipe = load_pipeline(model, args.dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    extra = default_call_kwargs(pipe, defaults)
    size = args.size
    if args.steps is None:
        args.steps = int(defaults.get("steps", 28))
    if args.guidance is not None and guidance_setting(pipe) == "true_cfg_scale":
        logger.info("--guidance sets true_cfg_scale (this model's transformer has no guidance embedding)")
    if args.compare:
        # one short untimed call first, so that neither timed run pays the warm-up
        _generate_once(pipe, args.prompt, 2, args.seed, size, args.guidance, extra)
        base, t_base = _generate_once(pipe, args.prompt, args.steps, args.seed, size, args.guidance, extra)
    info: dict[str, Any] = {}
    if stack is not None:
        diffboost.apply(pipe, stack)
    try:
        image, t_fast = _generate_once(pipe, args.prompt, args.steps, args.seed, size, args.guidance, extra)
        if stack is not None:
            info = diffboost.describe(pipe)
    finally:
        if stack is not None:
            diffboost.remove(pipe)
    from .batch import BatchJob

    job = BatchJob(0, args.prompt, args.seed, args.steps, size, args.guidance, label, str(model.resolve()), args.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**job.settings(), **_stack_metadata(stack, label), "height": image.height, "width": image.width}
    save_image(image, out, settings)
    print(f"model: {model} ({type(pipe).__name__})")
    print(f"plugins: {', '.join(info.get('plugins', [])) or 'none (plain pipeline)'}")
    counts = call_counts(info)
    if counts is not None:
        print(f"denoiser calls computed: {counts[0]}/{counts[1]} (the others reused, forecast or skipped)")
    print(f"{'accelerated' if stack else 'plain'}: {t_fast:.3f} s -> {out}")
    if args.compare:
        from .fidelity import psnr

        a = np.asarray(base.convert("RGB"), dtype=np.float32) / 255.0
        b = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        value = float(psnr(a[None], b[None]))
        side = _side_file(out)
        save_image_atomic(_side_by_side(base.convert("RGB"), image.convert("RGB")), side)
        print(f"baseline:    {t_base:.3f} s")
        print(f"speedup:     {t_base / t_fast:.2f}x")
        print(f"PSNR vs baseline: {value:.2f} dB")
        print(f"side by side (baseline | {'accelerated' if stack else 'plain'}): {side}")
    return 0


VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")


def _generate_video(args: argparse.Namespace, model: Path, stack: list[Any] | None, label: str,
                    defaults: dict[str, Any]) -> int:
    """``generate`` on a video pipeline: an MP4 (animated WebP/GIF without ffmpeg) and its sidecar JSON."""
    import diffboost

    from .batch import BatchJob
    from .generation import generate_jobs
    from .media import read_video, save_video, video_frames, video_suffix

    out = Path(args.out)
    want = video_suffix()
    if out.suffix.lower() not in VIDEO_SUFFIXES or (out.suffix.lower() == ".mp4" and want != ".mp4"):
        new = out.with_suffix(want)
        logger.info("%s makes videos: writing %s instead of %s", model.name, new, out)
        out = new
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {out / ('video' + want)}")
    check_output_dir(out.parent if str(out.parent) else Path("."), f"--out {out}")
    if args.compare:
        raise InputError("--compare is for images; compare videos with diffboost bench")
    frames = args.frames if args.frames is not None else defaults.get("num_frames")
    if frames is not None:
        from .limits import check_frames

        frames = check_frames(frames, "--frames")
    pipe = load_pipeline(model, args.dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    extra = default_call_kwargs(pipe, defaults)
    if frames is not None:
        extra["num_frames"] = frames
    steps = args.steps or int(defaults.get("steps", 28))
    job = BatchJob(0, args.prompt, args.seed, steps, args.size, args.guidance, label, str(model.resolve()),
                   args.dtype, suffix=out.suffix.lower())
    if stack is not None:
        diffboost.apply(pipe, stack)
    try:
        (video,), took = generate_jobs(pipe, [job], extra)
    finally:
        if stack is not None:
            diffboost.remove(pipe)
    settings = {**job.settings(), **_stack_metadata(stack, label)}
    if frames is not None:
        settings["num_frames"] = frames
    first = video_frames(video[:1])[0]
    settings["height"], settings["width"] = first.shape[0], first.shape[1]
    save_video(video, out, settings)
    print(f"model: {model} ({type(pipe).__name__})")
    print(f"plugins: {label if stack is not None else 'none (plain pipeline)'}")
    print(f"{'accelerated' if stack else 'plain'}: {took:.3f} s -> {out} ({len(read_video(out))} frames)")
    return 0


def _stack_metadata(stack: list[Any] | None, label: str) -> dict[str, Any]:
    """What every output records about how it was made beyond its row: the plugin stack as data
    (the format of ``diffboost.save``) and diffboost's version."""
    from . import __version__
    from .plugins.stacks import to_data

    data: Any = None
    if stack is not None:
        try:
            data = to_data(stack)
        except (TypeError, ValueError):  # a stack without a data form (a student folder) keeps its label
            data = None
    return {"plugin_stack": data, "plugins": label, "diffboost_version": __version__}


def cmd_batch(args: argparse.Namespace) -> int:
    import diffboost

    from . import distributed
    from .batch import make_jobs, run_batch
    from .limits import InputError
    from .media import video_suffix
    from .prompt_files import pipeline_call_args, read_rows

    ranks = distributed.from_env()
    # everything that can be wrong is checked before the model is loaded
    model = check_model_folder(args.model) if args.model else default_model_path()
    defaults = model_defaults(model)
    native = defaults.get("height") if isinstance(defaults.get("height"), int) else None
    rows = read_rows(args.prompts, pipeline_call_args(model), native)
    good = [{**r.settings, "row": r.number} for r in rows if r.error is None]
    errors = [(r.number, r.error) for r in rows if r.error is not None]
    if not good:
        shown = "; ".join(e for _, e in errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
        raise InputError(f"no row of {args.prompts} can be made: {shown}")
    stack, label = stack_from_args(args, model)
    check_settings(args, defaults)
    check_seed_range(args.seed, args.seeds)
    check_output_dir(args.out)
    device = distributed.device_for(ranks)
    distributed.init(ranks, device)
    try:
        pipe = load_pipeline(model, args.dtype, device=device)
        pipe.set_progress_bar_config(disable=True)  # one bar for the batch instead
        extra = default_call_kwargs(pipe, defaults)
        steps = args.steps or int(defaults.get("steps", 28))
        seeds = list(range(args.seed, args.seed + args.seeds))
        from .generation import generate_jobs, is_video_pipeline

        suffix = video_suffix() if is_video_pipeline(pipe) else ".png"
        if args.frames is not None:  # a default for rows without their own num_frames (part of each job's id)
            if suffix == ".png":
                raise InputError(f"--frames: {model} makes images, not videos")
            good = [{**e, "extra": {"num_frames": args.frames, **e.get("extra", {})}} for e in good]
        jobs = make_jobs(good, seeds, steps, size=args.size, guidance=args.guidance, plugins=label,
                         model=str(model.resolve()), dtype=args.dtype, suffix=suffix)
        for row, message in errors:
            logger.warning("%s", message)
        if stack is not None:
            diffboost.apply(pipe, stack)
        try:
            summary = run_batch(
                jobs, args.out, progress=not args.quiet,
                generate_many=lambda group: generate_jobs(pipe, group, extra), batch_size=args.batch_size,
                errors=errors, source=str(Path(args.prompts).resolve()), metadata=_stack_metadata(stack, label),
                ranks=ranks,
            )
        finally:
            if stack is not None:
                diffboost.remove(pipe)
        if summary["interrupted"]:
            where = f" (rank {ranks.rank})" if ranks.distributed else ""
            print(f"\ndiffboost batch{where}: interrupted; finished files are kept ({summary['made']} made in this run); "
                  "run the same command again to resume", file=sys.stderr)
            return 130
        summaries = distributed.gather(ranks, summary)
    finally:
        distributed.finish(ranks)
    if ranks.rank != 0:
        return 1 if errors or summary["failed"] else 0
    made = sum(s["made"] for s in summaries)
    skipped = sum(s["skipped"] for s in summaries)
    busy = sum(s["busy"] for s in summaries)
    failed = sum(s["failed"] for s in summaries)
    wall = max(s["wall"] for s in summaries)
    kind = "videos" if suffix != ".png" else "images"
    print(f"model: {model}; plugins: {label}")
    if ranks.distributed:
        for s in summaries:
            rate = f", {s['made'] / s['wall']:.3f} {kind}/s" if s["made"] else ""
            print(f"rank {s['rank']}: made {s['made']}, {s['skipped']} already done, {s['failed']} failed{rate}")
    per_image = f", {sum(s['seconds'] for s in summaries) / made:.3f} s per {kind[:-1]}" if made else ""
    rate = f", {made / wall:.3f} {kind}/s in all" if made and wall > 0 else ""
    busy_text = f", {busy} being made by another run" if busy else ""
    print(f"made {made} {kind}, {skipped} already done{busy_text}, {len(jobs)} in all -> {args.out}{per_image}{rate}")
    if errors or failed:
        print(f"{len(errors) + failed} row(s) could not be made; the manifest lists each with its row number and why")
    print(f"manifest: {Path(args.out) / 'manifest.jsonl'}")
    return 1 if errors or failed else 0


#: calibration prompts when ``--prompts`` is not given (the reference models' vocabulary)
CALIBRATION_PROMPTS = (
    DEFAULT_PROMPT,
    "a small blue square at the top on a gray background",
    "a large green triangle at the right on a black background",
    "a small yellow star at the center on a white background",
    "a small orange circle at the bottom on a black background",
    "a large purple star at the left on a gray background",
    "a small red triangle at the right on a white background",
    "a large yellow square at the center on a black background",
)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import diffboost

    from .batch import read_prompts
    from .plugins.calibrate import PRESET_LEVELS

    # everything that can be wrong is checked before the model is loaded
    args.preset = args.preset or "fast"
    if args.plugins:
        stack, label = stack_from_args(args)
    else:
        if args.preset == ONESTEP:
            raise ValueError("diffboost calibrate fits a preset's speed knob; onestep has none (choose its steps with "
                             "OneStep(path, steps=N) in a stack file)")
        if _preset_or_none(args.preset) is None:
            raise ValueError("diffboost calibrate needs a preset (safe, fast, turbo) or --plugins FILE, not none")
        stack, label = args.preset, args.preset
    if args.target is None and (args.plugins or args.preset not in PRESET_LEVELS):
        raise ValueError("--target DB is needed with --plugins (a preset's target is its level: "
                         + ", ".join(f"{k} {v:g}" for k, v in PRESET_LEVELS.items()) + ")")
    from .plugins.stacks import load

    alternatives = [load(path) for path in args.also]
    prompts = [e["prompt"] for e in read_prompts(args.prompts)] if args.prompts else list(CALIBRATION_PROMPTS)
    model = check_model_folder(args.model) if args.model else default_model_path()
    defaults = model_defaults(model)
    check_settings(args, defaults)
    check_seed_range(args.seed, args.seeds)
    out = check_stack_file(args.out or f"out/calibrated-{Path(label).stem.split('#')[0]}.toml")
    pipe = load_pipeline(model, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(pipe, defaults)
    kwargs["num_inference_steps"] = args.steps or int(defaults.get("steps", 28))
    if args.size:
        kwargs["height"] = kwargs["width"] = args.size
    knob = guidance_kwargs(pipe, args.guidance)
    if "negative_prompt" in kwargs:  # a negative prompt the model ships with wins
        knob.pop("negative_prompt", None)
    kwargs.update(knob)
    fit = diffboost.calibrate(pipe, stack, prompts=prompts, target_psnr=args.target,
                              seeds=list(range(args.seed, args.seed + args.seeds)), margin_db=args.margin,
                              max_trials=args.trials, alternatives=alternatives, **kwargs)
    diffboost.save(fit.plugins, out)
    print(f"model: {model}; calibrated {label} on {len(prompts)} prompts x {args.seeds} seeds, "
          f"{kwargs['num_inference_steps']} steps ({fit.pipeline_calls} pipeline calls)")
    print(fit.summary())
    print(f"stack: {out}  (use it with --plugins {out}, or diffboost.load)")
    return 0 if fit.reached else 1


def distill_prompts(path: str | None) -> list[str]:
    """A prompt file's prompts, or the scene generator's captions (every single-object scene, in a
    fixed shuffled order) when diffboost-reference is installed."""
    from .batch import read_prompts

    if path:
        return [e["prompt"] for e in read_prompts(path)]
    try:
        from diffboost_reference.data import scenes
    except ImportError:
        raise ValueError("--prompts FILE is needed: the built-in prompts come from the scene generator of "
                         "diffboost-reference (pip install ./reference)") from None
    import random

    captions = [s.caption for s in scenes.all_specs()]
    random.Random(24).shuffle(captions)
    return captions


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill

    config = DistillConfig(method=args.method, train_steps=args.steps, pairs=args.pairs, batch_size=args.batch_size,
                           lr=args.lr, max_student_steps=args.max_student_steps, teacher_steps=args.teacher_steps,
                           save_every=args.save_every, seed=args.seed, init=args.init,
                           fake_updates=args.fake_updates, regression_weight=args.regression_weight)
    teacher = check_model_folder(args.teacher) if args.teacher else default_model_path()
    out = Path(args.out or f"out/{teacher.name}-1step")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    prompts = distill_prompts(args.prompts)
    info = distill(teacher, out, prompts, config, work=args.work, pairs=args.pairs_dir, device=args.device,
                   resume=args.resume, progress=not args.quiet)
    last = info["history"][-1][1] if info["history"] else float("nan")
    print(f"student: {out} ({config.method}, {info['step']} steps, final loss {last:.4f}; teacher pairs "
          f"{info['pair_minutes']:.1f} min, training {info['train_minutes']:.1f} min)")
    print(f"generate with it: diffboost generate --model {out} --steps 1 --preset none")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .app.demo import launch

    extra = {}
    if args.plugins:
        stack, _ = stack_from_args(args)
        extra[Path(args.plugins).name] = stack
    launch(check_model_folder(args.model) if args.model else default_model_path(), args.host, args.port, args.dtype,
           stacks=extra)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``, shared by generate, batch and demo."""
    p.add_argument("--model", default=None, help="local Diffusers pipeline folder (default: assets/flux-shapes)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights dtype")


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    """``--preset NAME`` or ``--plugins FILE`` (a stack saved with ``diffboost.save``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="preset name: safe, fast, turbo, onestep (the distilled student "
                       "MODEL-1step next to the model), or none for the plain pipeline (default: fast; none for a "
                       "distilled student)")
    group.add_argument("--plugins", default=None, metavar="FILE",
                       help="a plugin stack file (.toml or .json, written by diffboost.save; presets are such files)")


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image with an accelerated pipeline",
        description="Generate one image with a diffboost preset (default: the embedded reference model).",
    )
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    _add_model_args(p)
    _add_stack_args(p)
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's, else 28)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=_positive_int, default=None, help="image height and width in pixels (default: model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: pipeline's)")
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="video pipelines: frames per clip (default: the model's)")
    p.add_argument("--out", default="out/diffboost.png", help="output image path (default: out/diffboost.png); video "
                   "pipelines write .mp4 (animated .webp/.gif without imageio-ffmpeg) and a .json sidecar")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the unpatched pipeline with the same seed; print both times, the speedup and the PSNR, "
        "and save both images side by side",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)


def _add_batch(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="generate a prompt file's images; resumable, atomic writes",
        description="Generate one image per prompt and seed. Images and manifest.jsonl are written atomically; "
        "re-running the same command skips finished images, so an interrupted batch resumes.",
    )
    p.add_argument("prompts", help="prompt file: .txt (one prompt per line, # comments), .jsonl or .csv with per-row "
                   "prompt, negative_prompt, seed, steps, size or height/width, guidance and other pipeline arguments")
    p.add_argument("--out", default="out/batch", help="output folder (default: out/batch)")
    _add_model_args(p)
    _add_stack_args(p)
    p.add_argument("--seeds", type=_positive_int, default=1, help="images per prompt, seeds --seed.. (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's, else 28)")
    p.add_argument("--size", type=_positive_int, default=None, help="image height and width in pixels (default: model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: pipeline's)")
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="video pipelines: frames per clip for rows without num_frames (default: the model's)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="rows with the same size, steps and settings made in one pipeline call, each with its own "
                   "seeded generator (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a preset or stack to a PSNR target on your model; writes a stack file",
        description="Run the plain pipeline on a few prompts, then the accelerated one at a few settings of "
        "the stack's speed knob (EasyCache threshold, SADA tolerance, ...), and save the fastest setting that "
        "keeps --target dB PSNR (+ --margin) against the plain images as a stack file for --plugins.",
    )
    _add_model_args(p)
    _add_stack_args(p)
    p.add_argument("--target", type=float, default=None,
                   help="PSNR target in dB (default: the preset's level, safe 45, fast 38, turbo 30)")
    p.add_argument("--margin", type=float, default=2.0, help="dB kept above the target (default: 2)")
    p.add_argument("--trials", type=_positive_int, default=8, help="most accelerated runs over the prompts (default: 8)")
    p.add_argument("--prompts", default=None,
                   help="prompt file (.txt or .jsonl, as for batch; default: 8 built-in prompts)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="seeds per prompt, from --seed (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's, else 28)")
    p.add_argument("--size", type=_positive_int, default=None, help="image height and width in pixels (default: model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--also", action="append", default=[], metavar="FILE",
                   help="another stack file to fit to the same target (repeatable); the fit computing the fewest "
                   "denoiser calls is written")
    p.add_argument("--out", default=None, help="stack file to write, .toml or .json (default: out/calibrated-NAME.toml)")
    p.set_defaults(func=cmd_calibrate)


def _add_distill(sub: Any) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a pipeline into a one-step (and 2-4-step) student; resumable",
        description="Data-free distillation: the teacher generates (noise, image) pairs with its own steps and "
        "guidance, and a copy of its denoiser learns to go there in 1 to --max-student-steps steps (rectified-flow "
        "reflow). Writes a pipeline folder of the teacher's class. Pairs and checkpoints live in a work folder "
        "(default OUT.work): run the same command again after an interruption and it continues.",
    )
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: assets/flux-shapes)")
    p.add_argument("--out", default=None, help="student pipeline folder to write (default: out/TEACHER-1step)")
    p.add_argument("--method", choices=("reflow", "dmd"), default="reflow",
                   help="reflow: regression on teacher pairs (1..N steps); dmd: DMD2 distribution matching with a "
                   "fake score network, plus the reflow regression (default: reflow)")
    p.add_argument("--init", default="teacher",
                   help="start the student from the teacher (default) or from a student folder (e.g. dmd on a reflow student)")
    p.add_argument("--fake-updates", type=_positive_int, default=5, help="dmd: fake-score updates per step (default: 5)")
    p.add_argument("--regression-weight", type=float, default=0.25,
                   help="dmd: weight of the reflow regression in the generator loss (default: 0.25)")
    p.add_argument("--steps", type=_positive_int, default=3000, help="student training steps (default: 3000)")
    p.add_argument("--pairs", type=_positive_int, default=8192, help="teacher pairs to generate (default: 8192)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="pairs per training step (default: 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    p.add_argument("--max-student-steps", type=_positive_int, default=4,
                   help="the student serves 1..N steps (default: 4)")
    p.add_argument("--teacher-steps", type=_positive_int, default=None, help="teacher steps per pair (default: the model's)")
    p.add_argument("--save-every", type=_positive_int, default=250, help="checkpoint period in steps (default: 250)")
    p.add_argument("--prompts", default=None, help="prompt file (.txt or .jsonl; default: the scene generator's captions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs and batches (default: 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    p.add_argument("--work", default=None, help="work folder for pairs and checkpoints (default: OUT.work)")
    p.add_argument("--pairs-dir", default=None,
                   help="folder of teacher pairs to make or reuse (default: WORK/pairs); runs on the same teacher, "
                   "prompts and seed can share one")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in the work folder to continue from")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_distill)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark plugins and rival tools side by side",
        description="Run named configurations on prompts x seeds and report speed, FLOPs and fidelity.",
    )
    try:
        from .bench import cli as bench_cli
    except ImportError as err:  # without diffboost-reference: say what to install when it is used
        reason = str(err)

        def missing(args: Any) -> int:
            raise ImportError(reason)

        p.set_defaults(func=missing, any_arguments=True)  # whatever follows, say what is missing
        return
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.run_from_args)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="web page: plain vs accelerated, side by side (needs the demo extra: Gradio)",
        description="Serve a Gradio page that runs a prompt through the plain and the accelerated pipeline "
        "and shows both images, their times, the speedup and PSNR/SSIM. Listens on 127.0.0.1 unless --host is given.",
    )
    _add_model_args(p)
    p.add_argument("--plugins", default=None, metavar="FILE",
                   help="also offer this plugin stack file (.toml or .json) on the page, selected first")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860, help="port (default: 7860)")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffboost", description="Drop-in acceleration for Diffusers pipelines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_batch(sub)
    _add_calibrate(sub)
    _add_distill(sub)
    _add_bench(sub)
    _add_demo(sub)
    return parser


def _quiet_loading() -> None:
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        import transformers.utils.logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user's mistake, a file-system problem, running out of memory or Ctrl-C end
    with one line on stderr and an exit code (2: bad input, 1: the run failed, 130: interrupted),
    never a traceback (``-v`` logs the traceback for a bug report)."""
    try:
        parser = build_parser()
    except KeyboardInterrupt:  # Ctrl-C while the subcommands' modules import
        print("\ndiffboost: interrupted", file=sys.stderr)
        return 130
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where = f"diffboost {args.command}"
    if getattr(args, "quiet", False):  # the loading bars of diffusers and transformers too
        _quiet_loading()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{where}: interrupted; finished files are kept (a batch resumes when run again)", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, ImportError) as err:
        logger.debug("details", exc_info=True)
        print(f"{where}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        logger.debug("details", exc_info=True)
        name = f": {err.filename}" if err.filename else ""
        print(f"{where}: error: {err.strerror or err}{name}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        logger.debug("details", exc_info=True)
        print(f"{where}: error: out of memory ({type(err).__name__}); try a smaller --size, fewer images at once, "
              "or --dtype bfloat16", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
