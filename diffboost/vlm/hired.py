"""HiRED (training-free; shared/ANCHORS.md section 5): the budget is shared out between image
partitions by an early layer's CLS attention, then each partition keeps its patches with the most CLS
attention in the final layer.

LLaVA-NeXT's partitions are its image crops; for the one-image LLaVA-1.5 layout the partitions are a
``rows x cols`` split of the patch grid (2 x 2 by default).
"""

from __future__ import annotations

import dataclasses

import torch

from ..plugins.base import check_int
from .base import VisionContext, VisualTokenPlugin, check_layer_field, gather_tokens, needs_cls, resolve_layer


def partition_ids(grid: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Partition number of every patch (patches,), row-major over a ``rows x cols`` split."""
    h, w = grid
    r = torch.arange(h).mul(rows).div(h, rounding_mode="floor")
    c = torch.arange(w).mul(cols).div(w, rounding_mode="floor")
    return (r[:, None] * cols + c[None, :]).reshape(-1)


def share_budget(weights: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Integer budgets per partition (images, parts) proportional to ``weights``, summing to
    ``budget`` (at most the total size), none above its partition's size: partitions whose share
    exceeds their size get all their tokens and the rest is shared again among the others; the
    fractions are rounded by largest remainder."""
    images, parts = weights.shape
    out = torch.zeros(images, parts, dtype=torch.long)
    budget = min(budget, int(sizes.sum()))
    for b in range(images):  # a handful of partitions per image
        w = weights[b].double().clamp_min(0) + 1e-12
        full = torch.zeros(parts, dtype=torch.bool)
        while True:
            left = budget - int(sizes[full].sum())
            share = torch.where(full, torch.zeros_like(w), w / w[~full].sum() * left)
            over = ~full & (share > sizes)
            if not bool(over.any()):
                break
            full |= over
        alloc = torch.where(full, sizes, share.floor().long())
        rest = budget - int(alloc.sum())
        frac = torch.where(full, torch.full_like(share, -1.0), share - share.floor())
        alloc[frac.argsort(descending=True, stable=True)[:rest]] += 1
        out[b] = alloc
    return out


def hired_select(early_cls: torch.Tensor, late_cls: torch.Tensor, parts: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (images, budget), ascending. ``*_cls``: CLS attention per patch (images, patches);
    ``parts``: partition of each patch (patches,)."""
    n_parts = int(parts.max()) + 1
    onehot = torch.nn.functional.one_hot(parts, n_parts).to(early_cls.dtype)  # (patches, parts)
    weights = early_cls @ onehot
    sizes = onehot.sum(0).long()
    # a few numbers per image: shared out on the CPU (one transfer per call)
    quota = share_budget(weights.cpu(), sizes.cpu(), budget).to(early_cls.device)  # (images, parts)
    # rank of each patch inside its partition by late CLS attention
    order = late_cls.argsort(dim=-1, descending=True)
    ranked_parts = parts[order]  # (images, patches) partition of the i-th best patch
    seen = torch.nn.functional.one_hot(ranked_parts, n_parts).cumsum(1)  # (images, patches, parts)
    rank_in_part = seen.gather(2, ranked_parts.unsqueeze(-1)).squeeze(-1) - 1
    chosen = rank_in_part < quota.gather(1, ranked_parts)
    index = order.masked_fill(~chosen, parts.numel())  # unchosen sort last
    return index.sort(dim=-1).values[:, :budget]


@dataclasses.dataclass(frozen=True)
class HiRED(VisualTokenPlugin):
    """HiRED: the budget split across image partitions by early CLS attention, filled inside each by
    final-layer CLS attention.

    Attributes:
        keep: visual tokens kept per image (share or count).
        early_layer: layer whose CLS attention shares the budget out (None: the first quarter of the
            depth; the paper uses an initial layer).
        late_layer: layer whose CLS attention picks tokens inside partitions (None: the layer that
            produces the visual features).
        partitions: ``rows x cols`` split of the patch grid (the paper's image partitions).
    """

    early_layer: int | None = None
    late_layer: int | None = None
    partition_rows: int = 2
    partition_cols: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer_field(self, "early_layer")
        check_layer_field(self, "late_layer")
        check_int(self, "partition_rows", 1, 64)
        check_int(self, "partition_cols", 1, 64)

    def layers(self, depth: int, feature_layer: int) -> tuple[int, int]:
        return (resolve_layer(self, "early_layer", depth, max(0, depth // 4 - 1) if depth > 1 else 0),
                resolve_layer(self, "late_layer", depth, feature_layer - 1))

    def check_model(self, adapter) -> None:
        needs_cls(self, adapter)
        self.layers(adapter.vision_depth, adapter.feature_layer)
        h, w = adapter.grid
        if self.partition_rows > h or self.partition_cols > w:
            raise ValueError(f"HiRED: a {self.partition_rows} x {self.partition_cols} split does not fit the "
                             f"{h} x {w} patch grid")

    def select(self, ctx: VisionContext) -> torch.Tensor:
        early, late = self.layers(ctx.adapter.vision_depth, ctx.adapter.feature_layer)
        parts = partition_ids(ctx.grid, self.partition_rows, self.partition_cols).to(ctx.features.device)
        index = hired_select(ctx.cls_attention(early), ctx.cls_attention(late), parts, ctx.kept)
        return gather_tokens(ctx.features, index)
