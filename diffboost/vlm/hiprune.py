"""HiPrune (training-free, inside the vision encoder; shared/ANCHORS.md section 5).

A middle "object" layer of the vision encoder attends to objects, a deep layer to global context.
HiPrune keeps three kinds of patch tokens, in this priority:

1. **anchors**: the ``round(alpha * budget)`` patches that receive the most attention (averaged over
   heads and queries) in the object layer;
2. **buffers**: the four grid neighbours of each anchor (spatial continuity), ranked by the same
   object-layer attention;
3. **registers**: the rest of the budget, the patches that receive the most attention in the deep
   layer.

The three tiers are one score (tier first, then the tier's attention), so one ``topk`` picks them all;
the kept patches are returned in spatial order.
"""

from __future__ import annotations

import dataclasses

import torch

from ..plugins.base import check_float
from .base import VisionContext, VisualTokenPlugin, check_layer_field, gather_tokens, resolve_layer, top_in_order


def neighbours(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patches 4-adjacent (on the grid) to a patch of ``mask`` (images, patches), without the mask's own."""
    h, w = grid
    m = mask.view(-1, h, w)
    out = torch.zeros_like(m)
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    out[:, :, 1:] |= m[:, :, :-1]
    out[:, :, :-1] |= m[:, :, 1:]
    return (out & ~m).view_as(mask)


def hiprune_scores(object_attention: torch.Tensor, deep_attention: torch.Tensor, grid: tuple[int, int],
                   budget: int, alpha: float) -> torch.Tensor:
    """One priority per patch (images, patches): anchors > buffers > registers, each tier ordered by
    its attention. ``*_attention``: attention received per patch, (images, patches)."""
    anchors_n = max(1, min(budget, round(alpha * budget)))
    anchor_idx = object_attention.topk(anchors_n, dim=-1).indices
    anchor = torch.zeros_like(object_attention, dtype=torch.bool).scatter_(1, anchor_idx, True)
    buffer = neighbours(anchor, grid)

    def unit(x: torch.Tensor) -> torch.Tensor:  # into [0, 1), order kept
        lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        return (x - lo) / (hi - lo).clamp_min(1e-12) * 0.999

    obj, deep = unit(object_attention.float()), unit(deep_attention.float())
    return torch.where(anchor, 2 + obj, torch.where(buffer, 1 + obj, deep))


def hiprune_select(object_attention: torch.Tensor, deep_attention: torch.Tensor, grid: tuple[int, int],
                   budget: int, alpha: float) -> torch.Tensor:
    """Indices (images, budget) of the kept patches, ascending."""
    return top_in_order(hiprune_scores(object_attention, deep_attention, grid, budget, alpha), budget)


@dataclasses.dataclass(frozen=True)
class HiPrune(VisualTokenPlugin):
    """HiPrune: anchors from a middle layer's attention, their grid neighbours, registers from a deep
    layer (training-free, before the projector).

    Attributes:
        keep: visual tokens kept per image (share or count; see :class:`VisualTokenPlugin`).
        alpha: share of the budget chosen as anchors (the paper's alpha, default 0.1); each anchor
            brings up to four buffer neighbours.
        object_layer: vision encoder layer (0-based, negative from the end) whose attention picks the
            anchors. None: 3/8 of the depth (the paper's layer 9 of CLIP-L's 24).
        deep_layer: layer whose attention picks the registers. None: the layer that produces the
            visual features.
    """

    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self, "alpha", 0.0, 1.0, lo_open=True)
        check_layer_field(self, "object_layer")
        check_layer_field(self, "deep_layer")

    def layers(self, depth: int, feature_layer: int) -> tuple[int, int]:
        return (resolve_layer(self, "object_layer", depth, max(0, round(depth * 3 / 8) - 1) if depth > 2 else 0),
                resolve_layer(self, "deep_layer", depth, feature_layer - 1))

    def check_model(self, adapter) -> None:
        self.layers(adapter.vision_depth, adapter.feature_layer)

    def select(self, ctx: VisionContext) -> torch.Tensor:
        obj, deep = self.layers(ctx.adapter.vision_depth, ctx.adapter.feature_layer)
        index = hiprune_select(ctx.received_attention(obj), ctx.received_attention(deep), ctx.grid, ctx.kept, self.alpha)
        return gather_tokens(ctx.features, index)
