"""Convert the image formats pipelines return into float tensors in [0, 1]."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


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
