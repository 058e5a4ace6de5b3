"""``diffboost bench --vlm``: visual-token pruners on a vision-language model, side by side.

For each method at each budget (share of the visual tokens kept per image), in one process:

- **accuracy** on procedural questions the model never saw (``diffboost_reference.data.vqa``,
  ``--question-offset``), overall and per question type, and the share of the unpruned model's
  accuracy it keeps;
- **time to first token** (``generate`` with one new token, batch 1: vision tower + prefill + one
  token), median over the timed questions and repeats, and its speedup over the unpruned model;
- **decode tokens/s** (``--decode-tokens`` forced new tokens, batch 1, minus the first token's time);
- **prefill tokens** the language model sees per question.

Configs are interleaved and their order rotates every repeat. Writes ``results.csv``, ``results.md``
and ``accuracy.png`` (accuracy retained vs budget, one line per method) into ``--out``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "llava-shapes"
METHOD_NAMES = ("HiPrune", "HiRED", "VisionZip", "FastV", "Downsample")
BUDGETS = (0.33, 0.25, 0.22, 0.11)


@dataclasses.dataclass
class VlmRow:
    name: str
    method: str
    keep: float
    kept_tokens: int
    accuracy: dict[str, float]
    retained: float
    ttft_s: float
    ttft_speedup: float
    decode_tok_s: float
    prefill_tokens: float
    #: share of questions answered exactly as the unpruned model answers them
    agreement: float = 1.0
    status: str = "ok"


def _plugin(method: str, keep: float) -> Any:
    from diffboost import vlm

    return getattr(vlm, method)(keep=keep)


def default_vlm_path() -> Path:
    """The shipped reference VLM (looked for where the default image model is looked for)."""
    from diffboost.generation import default_model_candidates

    candidates = default_model_candidates(DEFAULT_MODEL)
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    return candidates[-1]


def load(model_dir: Path, device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model folder (no config.json); the reference VLM is written by "
            "python -m diffboost_reference.training.train_vlm --out assets/llava-shapes"
        )
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


@torch.no_grad()
def _time_generate(model: Any, enc: dict[str, torch.Tensor], new_tokens: int) -> float:
    t = time.perf_counter()
    model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t


def run(model_dir: Path, *, methods: tuple[str, ...] = METHOD_NAMES, budgets: tuple[float, ...] = BUDGETS,
        questions: int = 512, question_offset: int = 100_000, timed: int = 16, repeats: int = 3,
        decode_tokens: int = 16, batch_size: int = 64, timed_batch: int = 1,
        device: str = "cpu") -> tuple[list[VlmRow], dict[str, Any]]:
    """Run the bench; returns the rows (first the unpruned model) and the workload description."""
    import diffboost
    from diffboost_reference.data import vqa
    from diffboost_reference.evaluation import vqa as vqa_eval

    for name, value in (("questions", questions), ("timed", timed), ("repeats", repeats), ("decode_tokens", decode_tokens),
                        ("timed_batch", timed_batch)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; allowed: {', '.join(METHOD_NAMES)}")
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise ValueError(f"budgets must be shares in (0, 1], got {bad}")
    model, processor = load(model_dir, device)
    examples = vqa.held_out(questions, offset=question_offset)
    timed_examples = vqa.held_out(timed * timed_batch, offset=question_offset)
    configs: list[tuple[str, str, float]] = [("none", "none", 1.0)]
    configs += [(f"{m} {b:.0%}", m, b) for b in budgets for m in methods]

    def patched(method: str, keep: float) -> None:
        if method != "none":
            diffboost.apply(model, _plugin(method, keep))

    acc: dict[str, dict[str, float]] = {}
    said: dict[str, list[str]] = {}
    kept: dict[str, int] = {}
    prefill: dict[str, float] = {}
    for name, method, keep in configs:
        patched(method, keep)
        try:
            answers = vqa_eval.answers(model, processor, examples, batch_size=batch_size)
            acc[name] = vqa_eval.accuracy(answers, examples)
            said[name] = answers
            enc = {k: v.to(device) for k, v in vqa_eval.inputs(processor, examples[:1]).items()}
            model.generate(**enc, max_new_tokens=1)
            stats = diffboost.describe(model).get("last_call", [{}]) if method != "none" else [{}]
            s = stats[0] if stats else {}
            per_image = s.get("kept_per_image", s.get("kept_image_tokens"))
            kept[name] = int(per_image) if per_image is not None else int(model.config.image_seq_length)
            prefill[name] = float(s.get("pruned_prompt_tokens", s.get("tokens_after_layer", enc["input_ids"].shape[1])))
        finally:
            diffboost.remove(model)
        logger.info("%s: accuracy %.3f", name, acc[name]["all"])

    ttft: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    total: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    encs = [{k: v.to(device) for k, v in vqa_eval.inputs(processor, timed_examples[i : i + timed_batch]).items()}
            for i in range(0, len(timed_examples), timed_batch)]
    for repeat in range(repeats):
        order = configs[repeat % len(configs):] + configs[: repeat % len(configs)]
        for name, method, keep in order:
            patched(method, keep)
            try:
                _time_generate(model, encs[0], 1)  # warm-up
                for enc in encs:
                    ttft[name].append(_time_generate(model, enc, 1))
                    total[name].append(_time_generate(model, enc, decode_tokens))
            finally:
                diffboost.remove(model)
    base_acc = acc["none"]["all"]
    base_ttft = statistics.median(ttft["none"])
    rows = []
    for name, method, keep in configs:
        t1 = statistics.median(ttft[name])
        tn = statistics.median(total[name])
        rows.append(VlmRow(
            name=name, method=method, keep=keep, kept_tokens=kept[name], accuracy=acc[name],
            retained=acc[name]["all"] / base_acc if base_acc else math.nan, ttft_s=t1, ttft_speedup=base_ttft / t1,
            decode_tok_s=(decode_tokens - 1) * timed_batch / max(tn - t1, 1e-9), prefill_tokens=prefill[name],
            agreement=sum(a == b for a, b in zip(said[name], said["none"])) / len(examples),
        ))
    workload = {"model": str(model_dir), "questions": questions, "question_offset": question_offset, "timed": timed,
                "repeats": repeats, "decode_tokens": decode_tokens, "device": device, "timed_batch": timed_batch,
                "threads": torch.get_num_threads(), "visual_tokens_per_image": int(model.config.image_seq_length)}
    return rows, workload


QTYPES = ("color", "shape", "count", "exists")


def markdown(rows: list[VlmRow], workload: dict[str, Any]) -> str:
    w = workload
    lines = [
        f"Model: `{w['model']}` ({w['visual_tokens_per_image']} visual tokens per image), {w['questions']} held-out "
        f"questions (seeds from {w['question_offset']}), {w['device']}, {w['threads']} threads.",
        "",
        f"Accuracy: greedy one-word answers, batch 64. Time to first token (TTFT): `generate` with one new token, "
        f"batch {w['timed_batch']}, median over {w['timed']} calls x {w['repeats']} repeats (configs interleaved). Decode: "
        f"{w['decode_tokens']} forced new tokens, batch {w['timed_batch']}, tokens/s after the first (all rows). "
        "Prefill tokens: the prompt the "
        "language model sees (FastV: after its pruning layer). Same answer: share of questions answered exactly as "
        "the unpruned model answers them (its fidelity, right or wrong).",
        "",
        "| config | visual tokens | accuracy | retained | same answer | color | shape | count | exists | TTFT ms "
        "| prefill speedup | decode tok/s | prefill tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r.accuracy
        lines.append(
            f"| `{r.name}` | {r.kept_tokens} | {a['all']:.3f} | {r.retained:.1%} | {r.agreement:.1%} | "
            + " | ".join(f"{a.get(q, math.nan):.3f}" for q in QTYPES)
            + f" | {r.ttft_s * 1e3:.1f} | {r.ttft_speedup:.2f}x | {r.decode_tok_s:.0f} | {r.prefill_tokens:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_all(rows: list[VlmRow], workload: dict[str, Any], out: Path) -> dict[str, Path]:
    from diffboost.files import write_text_atomic as atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    header = ["name", "method", "keep", "visual_tokens", "accuracy", "retained", "agreement", *[f"acc_{q}" for q in QTYPES],
              "ttft_s", "ttft_speedup", "decode_tok_s", "prefill_tokens"]
    lines = [",".join(header)]
    for r in rows:
        vals = [r.name, r.method, r.keep, r.kept_tokens, r.accuracy["all"], r.retained, r.agreement,
                *[r.accuracy.get(q, math.nan) for q in QTYPES], r.ttft_s, r.ttft_speedup, r.decode_tok_s, r.prefill_tokens]
        lines.append(",".join(f'"{v}"' if isinstance(v, str) else f"{v:.6g}" if isinstance(v, float) else str(v)
                              for v in vals))
    files = {"csv": out / "results.csv", "md": out / "results.md"}
    atomic_write_text(files["csv"], "\n".join(lines) + "\n")
    atomic_write_text(files["md"], markdown(rows, workload))
    plot = _plot(rows, out / "accuracy.png")
    if plot is not None:
        files["png"] = plot
    return files


def _plot(rows: list[VlmRow], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: plot skipped (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in sorted({r.method for r in rows if r.method != "none"}):
        pts = sorted((r.keep, r.retained) for r in rows if r.method == method)
        ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], marker="o", label=method)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("visual tokens kept [%]")
    ax.set_ylabel("accuracy retained [%] of the unpruned model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from diffboost.files import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written before any model work."""
    import os

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the output folder is not writable")


def run_from_args(args: Any) -> int:
    """``diffboost bench --vlm``."""
    model = args.model or default_vlm_path()
    quick = bool(args.quick)
    try:
        try:
            budgets = tuple(float(b) for b in args.budgets.split(",")) if args.budgets else BUDGETS
        except ValueError:
            raise ValueError(f"--budgets {args.budgets!r}: give comma-separated shares in (0, 1], e.g. 0.33,0.25") from None
        _check_writable(Path(args.out))
        methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHOD_NAMES
        rows, workload = run(
            Path(model), methods=methods, budgets=budgets[:1] if quick and not args.budgets else budgets,
            questions=args.questions or (16 if quick else 512), question_offset=args.question_offset,
            timed=2 if quick else args.timed, repeats=args.repeats or (1 if quick else 3), timed_batch=args.timed_batch,
            decode_tokens=4 if quick else args.decode_tokens, device=args.device or "cpu",
        )
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    files = write_all(rows, workload, args.out)
    print(markdown(rows, workload))
    for kind, path in files.items():
        logger.info("wrote %s: %s", kind, path)
    return 0
