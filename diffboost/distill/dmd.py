"""Distribution matching distillation (DMD2), in the flow-matching convention: the math, pure functions.

The generator's one-step image ``x0 = z - G(z, 1)`` is noised again to a random level ``t``
(``x_t = (1 - t) * x0 + t * n``). Two networks denoise it: the teacher with its guidance (the
"real" score) and a "fake" score network trained online on the generator's own images. Their
clean-image predictions differ where the generator's distribution differs from the teacher's; the
generator moves along ``x0_fake - x0_real``, normalised per sample by ``mean|x0 - x0_real|``
(DMD2, shared/ANCHORS.md section 7). The fake network is updated several times per generator step
(two time-scale update rule) with the plain flow-matching loss on the generator's images.
"""

from __future__ import annotations

import torch


def noise_to(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) * x0 + t * noise`` (one ``t`` per sample)."""
    s = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def clean_prediction(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The clean image a velocity points at from ``x_t``: ``x_t - t * v``."""
    s = t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return x_t - s * velocity


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The distribution-matching direction for the generator's images ``x0`` (to descend)."""
    dims = tuple(range(1, x0.ndim))
    scale = (x0 - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return (x0_fake - x0_real) / scale


def dmd_loss(x0: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to ``x0`` is ``gradient / numel``: ``0.5 * |x0 - sg(x0 - g)|^2``."""
    return 0.5 * torch.nn.functional.mse_loss(x0.float(), (x0 - gradient).detach().float())


def fake_score_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow matching on the generator's images: the velocity of ``x_t`` is ``noise - x0``."""
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the teacher's pipeline applies it."""
    return uncond + scale * (cond - uncond)
