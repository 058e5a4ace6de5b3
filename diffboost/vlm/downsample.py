"""The downsampling baseline: average-pool the grid of visual features to the budget.

A 2025 benchmark (VTC-Bench) found that plain downsampling beats many pruners; every comparison of
pruners here includes it. The pooled grid is the largest ``a x b`` (``|a - b| <= 1``) with at most the
budget's tokens, so it may keep a few tokens fewer than the pruners (the bench reports the count).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import VisionContext, VisualTokenPlugin, budget


def pooled_grid(tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The largest near-square ``(a, b)`` grid with ``a * b <= tokens`` that fits ``grid``."""
    h, w = grid
    a = max(1, min(h, math.isqrt(tokens)))
    b = max(1, min(w, tokens // a))
    if b > a + 1:
        b = a + 1 if a + 1 <= w else b
    return a, b


def downsample(features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(images, patches, width) -> (images, a*b, width), average-pooled over the patch grid."""
    images, n, width = features.shape
    x = features.transpose(1, 2).reshape(images, width, *grid)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), size).to(features.dtype)
    return pooled.flatten(2).transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class Downsample(VisualTokenPlugin):
    """Average-pool the visual features' grid to the budget (the baseline every pruner must beat).

    Attributes:
        keep: visual tokens per image (share or count); rounded down to a near-square grid.
    """

    def kept_tokens(self, adapter) -> int:
        n = budget(self.keep, adapter.patches)
        if n >= adapter.patches:
            return adapter.patches
        a, b = pooled_grid(n, adapter.grid)
        return a * b

    def select(self, ctx: VisionContext) -> torch.Tensor:
        return downsample(ctx.features, ctx.grid, pooled_grid(ctx.kept, ctx.grid))
