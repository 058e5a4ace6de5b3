"""Fidelity of an accelerated image against the plain pipeline's: PSNR and SSIM, and the image
formats pipelines return converted to [0, 1] tensors. Pure functions, no model; used by the command
line, the demo and the bench.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor01(images: Any) -> torch.Tensor:
    """Images -> float32 tensor (N, 3, H, W) in [0, 1].

    Accepts a list of PIL images, a uint8 or float numpy array (N, H, W, 3) or (H, W, 3), or a
    tensor (N, 3, H, W) / (3, H, W) already in [0, 1].
    """
    if isinstance(images, torch.Tensor):
        t = images.detach().float().cpu()
        return (t.unsqueeze(0) if t.dim() == 3 else t).clamp(0, 1)
    if isinstance(images, np.ndarray):
        arr = images
    elif isinstance(images, Sequence):
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    else:  # a single PIL image
        arr = np.asarray(images.convert("RGB"))[None]
    if arr.ndim == 3:
        arr = arr[None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if arr.dtype == np.uint8:
        t = t / 255.0
    return t.permute(0, 3, 1, 2).clamp(0, 1)


def psnr(a: Any, b: Any, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image pair (``reduction='none'``) or averaged.

    Identical images give ``inf``.
    """
    x, y = to_tensor01(a).double(), to_tensor01(b).double()
    mse = (x - y).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range**2 / mse)
    return out if reduction == "none" else out.mean()


def pooled_psnr(a: Any, b: Any, data_range: float = 1.0) -> tuple[float, float]:
    """PSNR of the mean squared error over all image pairs (``inf`` only when all are identical; one bad
    image weighs fully), and the worst pair's PSNR. The measure of ``diffboost bench`` and
    :func:`diffboost.calibrate`."""
    per_image = psnr(a, b, data_range, reduction="none")
    mse = torch.pow(10.0, -per_image / 10).mean()
    pooled = float("inf") if mse == 0 else float(-10 * torch.log10(mse))
    return pooled, float(per_image.min())


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    a: Any,
    b: Any,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a gaussian window, per channel, valid region.

    Constants K1=0.01, K2=0.03. Returns the mean SSIM map value per image or averaged.
    """
    x, y = to_tensor01(a).double(), to_tensor01(b).double()
    c = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, sigma, c)
    mu_x = F.conv2d(x, w, groups=c)
    mu_y = F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    out = smap.flatten(1).mean(1)
    return out if reduction == "none" else out.mean()
