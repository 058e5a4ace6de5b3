"""Train the attribute classifier used to evaluate generated scenes.

``python -m diffboost_reference.training.train_evaluator --out assets/evaluator`` renders procedural scenes on
the fly, augments them (blur, noise, colour jitter, down/up-sampling) so that the classifier also
reads soft, noisy generated images, and writes safetensors weights, a JSON config and held-out
accuracies (``accuracy.json``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffboost_reference.data import scenes
from diffboost_reference.evaluation.classifier import AttributeClassifier
from diffboost_reference.training.common import setup_logging, step_generator

logger = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 200_000_000
HELDOUT_SEED_OFFSET = 900_000_000


def labelled_batch(seeds: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rendered scenes as [0, 1] tensors plus class-index labels per attribute."""
    images, sc = scenes.make_batch(seeds)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    labels = {
        k: torch.tensor([values.index(s.attributes[k]) for s in sc]) for k, values in scenes.ATTRIBUTES.items()
    }
    return x, labels


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image gaussian blur (5x5 kernel) with per-image sigma."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k1 = k1 / k1.sum(-1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # (N, 5, 5)
    n, c, h, w = x.shape
    weight = k2.repeat_interleave(c, 0)[:, None]  # (N*C, 1, 5, 5)
    out = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate"), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random blur, down/up-sampling, colour jitter and noise, on [0, 1] images."""
    n = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    sigma = u(n) * 1.5 * strength
    x = torch.where((u(n) < 0.6)[:, None, None, None], _gaussian_blur(x, sigma), x)
    if u(()) < 0.3 * strength:
        x = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2, mode="bilinear")
    x = x * (1 + (u(n, 1, 1, 1) - 0.5) * 0.2 * strength) + (u(n, 3, 1, 1) - 0.5) * 0.1 * strength
    x = x + torch.randn(x.shape, generator=g) * (u(n, 1, 1, 1) * 0.08 * strength)
    return x.clamp(0, 1)


@torch.no_grad()
def heldout_accuracy(model: AttributeClassifier, n: int, augmented: bool) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` held-out scenes (optionally augmented)."""
    model.eval()
    correct = {k: 0 for k in model.attributes}
    for i in range(0, n, 256):
        seeds = list(range(HELDOUT_SEED_OFFSET + i, HELDOUT_SEED_OFFSET + min(n, i + 256)))
        x, labels = labelled_batch(seeds)
        if augmented:
            x = augment(x, torch.Generator().manual_seed(i))
        logits, _ = model(x * 2 - 1)
        for k in correct:
            correct[k] += int((logits[k].argmax(-1) == labels[k]).sum())
    acc = {k: v / n for k, v in correct.items()}
    acc["all_attributes_mean"] = sum(acc.values()) / len(acc)
    return acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("assets/evaluator"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--heldout", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny network, for tests")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_logging()
    torch.manual_seed(args.seed)
    model = AttributeClassifier(channels=(8, 8, 8, 8), embed_dim=16) if args.tiny else AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 2), pct_start=0.1)
    t0 = time.monotonic()
    model.train()
    for step in tqdm(range(args.steps), desc="evaluator", mininterval=30):
        g = step_generator(args.seed + 7, step)
        seeds = (torch.randint(0, 100_000_000, (args.batch_size,), generator=g) + TRAIN_SEED_OFFSET).tolist()
        x, labels = labelled_batch(seeds)
        x = torch.cat([x[: len(x) // 4], augment(x[len(x) // 4 :], g)])  # a quarter stays clean
        logits, _ = model(x * 2 - 1)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            logger.info("step %d loss %.4f", step, loss.item())
    minutes = (time.monotonic() - t0) / 60
    clean = heldout_accuracy(model, args.heldout, augmented=False)
    noisy = heldout_accuracy(model, args.heldout, augmented=True)
    logger.info("held-out accuracy clean %s", json.dumps(clean))
    logger.info("held-out accuracy augmented %s", json.dumps(noisy))
    model.save(args.out)
    report = {
        "heldout_images": args.heldout,
        "heldout_seed_offset": HELDOUT_SEED_OFFSET,
        "clean": clean,
        "augmented": noisy,
        "train_steps": args.steps,
        "batch_size": args.batch_size,
        "train_minutes": round(minutes, 2),
        "threads": args.threads,
    }
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
