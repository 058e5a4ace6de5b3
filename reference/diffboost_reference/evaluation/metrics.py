"""Image-quality and prompt-adherence metrics for generated scenes.

All image inputs may be PIL lists, uint8/float numpy arrays (N, H, W, 3) or [0, 1] tensors
(N, 3, H, W); see :func:`diffboost.fidelity.to_tensor01`. PSNR and SSIM live in
:mod:`diffboost.fidelity` and are re-exported here.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffboost_reference.data.scenes import parse_caption
from diffboost_reference.evaluation.classifier import AttributeClassifier, load_evaluator
from diffboost.fidelity import psnr, ssim, to_tensor01  # noqa: F401  (part of this module's API)

logger = logging.getLogger(__name__)


def _evaluator(evaluator: AttributeClassifier | None) -> AttributeClassifier:
    return evaluator if evaluator is not None else load_evaluator()


def embeddings(images: Any, evaluator: AttributeClassifier | None = None) -> torch.Tensor:
    """Evaluator embeddings (N, D) of images."""
    return _evaluator(evaluator).embed_images(images).double()


def feature_distance(
    a: Any, b: Any, evaluator: AttributeClassifier | None = None, kind: str = "cosine", reduction: str = "mean"
) -> torch.Tensor:
    """Per-pair distance between evaluator embeddings: ``cosine`` (1 - cos) or ``l2``."""
    ea, eb = embeddings(a, evaluator), embeddings(b, evaluator)
    if kind == "cosine":
        d = 1 - F.cosine_similarity(ea, eb, dim=1, eps=1e-12)
    elif kind == "l2":
        d = (ea - eb).norm(dim=1)
    else:
        raise ValueError(f"unknown distance kind {kind!r}")
    return d if reduction == "none" else d.mean()


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(s1 s2) for symmetric PSD matrices via symmetric eigendecompositions.

    Uses tr sqrt(s1 s2) = tr sqrt(A s2 A) with A = sqrt(s1), whose argument is symmetric PSD. No scipy:
    ``scipy.linalg.sqrtm`` changed its signature (``disp`` was removed) and works on the non-symmetric
    product, where this stays real and stable.
    """
    val, vec = torch.linalg.eigh(torch.from_numpy(s1))
    a = vec @ torch.diag(val.clamp_min(0).sqrt()) @ vec.T
    m = a @ torch.from_numpy(s2) @ a
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between gaussians fitted to two sets of feature vectors (rows)."""
    xa = torch.as_tensor(feats_a).double().cpu().numpy()
    xb = torch.as_tensor(feats_b).double().cpu().numpy()
    mu1, mu2 = xa.mean(0), xb.mean(0)
    s1 = np.atleast_2d(np.cov(xa, rowvar=False))
    s2 = np.atleast_2d(np.cov(xb, rowvar=False))
    tr = trace_sqrt_product(s1, s2)
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr, 0.0))


def frechet_evaluator_distance(a: Any, b: Any, evaluator: AttributeClassifier | None = None) -> float:
    """Fréchet distance between evaluator embeddings of two image sets (an FID-like score)."""
    ev = _evaluator(evaluator)
    return frechet_distance(embeddings(a, ev), embeddings(b, ev))


def attribute_accuracy(
    images: Any, prompts: Sequence[str], evaluator: AttributeClassifier | None = None
) -> dict[str, float]:
    """Share of images whose predicted attribute matches the prompt, per attribute and ``all``."""
    if len(prompts) != len(to_tensor01(images)):
        raise ValueError("need one prompt per image")
    preds = _evaluator(evaluator).predict(images)
    targets = [parse_caption(p) for p in prompts]
    keys = list(targets[0])
    out = {k: float(np.mean([p[k] == t[k] for p, t in zip(preds, targets)])) for k in keys}
    out["all"] = float(np.mean([all(p[k] == t[k] for k in keys) for p, t in zip(preds, targets)]))
    return out


def prompt_adherence(images: Any, prompts: Sequence[str], evaluator: AttributeClassifier | None = None) -> float:
    """Share of images whose predicted attributes all match the prompt's (first object + background)."""
    return attribute_accuracy(images, prompts, evaluator)["all"]
