"""Shared pieces of the reference-model trainers: tokenizer, checkpoints, EMA, logging, data."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from transformers import PreTrainedTokenizerFast

from diffboost_reference.data import scenes

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def setup_logging(log_file: Path | None = None) -> None:
    """Log INFO to stderr (and to ``log_file`` when given)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers, force=True
    )


def build_tokenizer(max_length: int = 16, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the caption vocabulary (``words``, default the scenes'); appends
    ``</s>`` to every text.

    Ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then the caption words.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in scenes.vocabulary() if words is None else words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def tokenize(tokenizer: PreTrainedTokenizerFast, captions: list[str], length: int) -> torch.Tensor:
    """Token ids padded/truncated to ``length`` (as the pipelines do)."""
    return tokenizer(
        captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def scene_batch(seeds: list[int], size: int = scenes.IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """Rendered single-object scenes (``size`` px) as a [-1, 1] tensor plus captions."""
    images, sc = scenes.make_batch(seeds, size=size)
    return images_to_tensor(images), [s.caption for s in sc]


def object_mask(x: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """(B, 1, H, W) float mask of pixels that differ from the scene's background.

    The background is the per-image median colour (it covers most of every scene); a pixel belongs to
    an object when its summed absolute channel difference from that colour exceeds ``threshold`` on
    the [-1, 1] scale.
    """
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    return ((x - background).abs().sum(dim=1, keepdim=True) > threshold).to(x.dtype)


def object_share(seeds: list[int], size: int, cell: int, chunk: int = 512) -> torch.Tensor:
    """(N, 1, size/cell, size/cell): the share of each ``cell`` x ``cell`` pixel block of the scenes
    (``size`` px) that belongs to an object, the weight map of the object-weighted denoiser loss."""
    out = []
    for i in range(0, len(seeds), chunk):
        x, _ = scene_batch(seeds[i : i + chunk], size)
        out.append(F.avg_pool2d(object_mask(x), cell))
    return torch.cat(out)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, dim: int) -> torch.Tensor:
    """MSE; with ``weight`` a weighted mean over positions, the squared error first averaged over the
    channel dimension ``dim`` (``weight`` has ``pred``'s shape without it)."""
    if weight is None:
        return F.mse_loss(pred, target)
    err = (pred - target).pow(2).mean(dim=dim)
    return (err * weight).sum() / weight.sum()


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step): resumed runs draw the same data."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file (tensors + JSON metadata), written atomically.
# ---------------------------------------------------------------------------------------------


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{idx}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: Any) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith(prefix + ".state."):
            continue
        idx, name = key[len(prefix) + 7 :].split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    meta: dict[str, Any],
) -> None:
    """Save modules, optimizers and JSON-able ``meta`` to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, Any] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"module.{name}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
    for name, opt in optimizers.items():
        t, m = _flatten_optimizer(f"optim.{name}", opt)
        tensors.update(t)
        opt_meta[name] = m
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "optim": json.dumps(opt_meta)})
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``meta``."""
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    tensors = load_file(str(path))
    for name, mod in modules.items():
        prefix = f"module.{name}."
        mod.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    opt_meta = json.loads(md["optim"])
    for name, opt in optimizers.items():
        _restore_optimizer(f"optim.{name}", opt, tensors, opt_meta[name])
    return json.loads(md["meta"])


class EMA:
    """Exponential moving average of a module's parameters (warm-up decay)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999) -> None:
        import copy

        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in module.parameters()], 1 - d)
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, modules: dict[str, torch.nn.Module],
                   emas: dict[str, "EMA"], step: int, max_norm: float = 1.0) -> None:
    """Backward, clip each module's gradient norm to ``max_norm`` separately, step, update each
    module's EMA (``emas`` and ``modules`` share their names)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for module in modules.values():
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    opt.step()
    for name, module in modules.items():
        emas[name].update(module, step)


class Timer:
    """Wall-clock helper for periodic actions."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            return True
        return False


def lr_factor(step: int, warmup: int = 200, decay_from: int = 0, decay_to: int = 0, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then constant, then a
    cosine from 1 at ``decay_from`` down to ``min_ratio`` at ``decay_to`` (kept after). ``decay_to <=
    decay_from`` means no decay. A pure function of the step, so resumed runs follow the same curve."""
    warm = min(1.0, (step + 1) / warmup)
    if decay_to <= decay_from or step < decay_from:
        return warm
    frac = min(1.0, (step - decay_from) / (decay_to - decay_from))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def add_trainer_args(p, *, out: Path, work_dir: Path, vae_dir: Path | None, lr: float) -> None:
    """The arguments both denoiser trainers share: VAE stage, data, optimiser, evaluation,
    checkpoints, ``--export`` and the LR decay (:func:`add_lr_decay_args`)."""
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--work-dir", type=Path, default=work_dir)
    p.add_argument("--vae-dir", type=Path, default=vae_dir,
                   help="where the shared VAE and latent cache live (default: %(default)s; None = work dir)")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-object-weight", type=float, default=0.0,
                   help="> 0: VAE loss L1 + MSE + this x object-pixel L1 (0: plain L1, the first recipe; it merged green and blue)")
    p.add_argument("--num-images", type=int, default=8192)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (checkpointed) after this long; 0 = no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu",
                   help="where the models train: cpu (default) or cuda[:N]. Data are drawn on the CPU from the "
                        "same seeded generators either way; results are not bit-identical across devices")
    p.add_argument("--object-loss-weight", type=float, default=0.0,
                   help="> 0: weight each latent position's loss by 1 + this x the object share of its pixels "
                        "(0: plain MSE)")
    p.add_argument("--oversample-small", type=float, default=1.0,
                   help="draw training scenes whose object is small this many times as often as scenes with a "
                        "large one (default 1: uniform). Small objects' shapes are the last thing the models "
                        "learn (the shape errors of earlier SD models were small objects)")
    p.add_argument("--tiny", action="store_true", help="tiny models, for tests")
    p.add_argument("--export", action="store_true", help="only evaluate + save the checkpoint's EMA pipeline")
    add_lr_decay_args(p)


def check_trainer_args(p, args) -> None:
    """Checks shared by both trainers (LR decay, ``--drop-caption``)."""
    check_lr_decay_args(p, args)
    args.device = resolve_device(p, args.device)
    if args.vae_object_weight < 0:
        p.error(f"--vae-object-weight must be >= 0, got {args.vae_object_weight}")
    if args.object_loss_weight < 0:
        p.error(f"--object-loss-weight must be >= 0, got {args.object_loss_weight}")
    if not 1.0 <= args.oversample_small < float("inf"):
        p.error(f"--oversample-small must be >= 1 and finite (1 = uniform sampling), got {args.oversample_small}")
    if not 0.0 <= args.drop_caption < 1.0:
        p.error(f"--drop-caption must be in [0, 1), got {args.drop_caption}")


def resolve_device(p, name: str) -> torch.device:
    """``--device`` as a :class:`torch.device`; a clear error for unknown names or a missing GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        p.error(f"--device: unknown device {name!r}; supported: cpu, cuda, cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device: {device.type!r} is not supported; supported: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (this torch build or machine has none); use --device cpu")
    return device


def add_lr_decay_args(p) -> None:
    """``--decay-from/--decay-to/--min-lr-ratio`` (see :func:`lr_factor`)."""
    p.add_argument("--decay-from", type=int, default=0, help="step where the cosine LR decay starts")
    p.add_argument("--decay-to", type=int, default=0, help="step where it reaches --min-lr-ratio (0: no decay)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a share of the base LR")


def check_lr_decay_args(p, args) -> None:
    if args.decay_to and args.decay_to <= args.decay_from:
        p.error(f"--decay-to ({args.decay_to}) must be after --decay-from ({args.decay_from})")
    if not 0.0 < args.min_lr_ratio <= 1.0:
        p.error(f"--min-lr-ratio must be in (0, 1], got {args.min_lr_ratio}")


def scene_draw_weights(captions: list[str], oversample_small: float) -> torch.Tensor | None:
    """Per-scene sampling weights (on the CPU): ``oversample_small`` for scenes whose object is small,
    1 otherwise; ``None`` (uniform) when ``oversample_small`` is 1."""
    if oversample_small == 1.0:
        return None
    small = torch.tensor([scenes.parse_caption(c)["size"] == "small" for c in captions])
    weights = torch.where(small, oversample_small, 1.0)
    logger.info("scenes with a small object drawn %.1fx as often (%.0f%% of draws)", oversample_small,
                100 * weights[small].sum().item() / weights.sum().item())
    return weights


def draw_scenes(weights: torch.Tensor | None, num: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` indices into ``num`` scenes, drawn with replacement: uniformly when ``weights`` is None (the
    draw of every earlier run), else in proportion to ``weights``."""
    if weights is None:
        return torch.randint(0, num, (n,), generator=g)
    return torch.multinomial(weights, n, replacement=True, generator=g)
