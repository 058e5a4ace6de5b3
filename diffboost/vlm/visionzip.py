"""VisionZip (training-free; shared/ANCHORS.md section 5): *dominant* tokens, the patches the CLS token
attends to most, plus a few *contextual* tokens, each the average of a group of the remaining
patches merged by key similarity.

The contextual targets are spread evenly over the remaining patches (in raster order); every other
remaining patch joins the target whose key is most similar (cosine, keys averaged over heads).
Output: the dominant patches in spatial order, then the contextual tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from ..plugins.base import check_float
from .base import VisionContext, VisualTokenPlugin, check_layer_field, gather_tokens, needs_cls, resolve_layer, top_in_order


def split_budget(budget: int, dominant: float) -> tuple[int, int]:
    """(dominant, contextual) token counts: at least one dominant token; the rest contextual."""
    d = max(1, min(budget, round(budget * dominant)))
    return d, budget - d


def visionzip_merge(features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, budget: int,
                    dominant: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens (images, budget, width) and the dominant indices (images, d), ascending.

    ``features``/``keys``: (images, patches, width/dim); ``cls_attention``: (images, patches)."""
    images, n, width = features.shape
    d, c = split_budget(budget, dominant)
    dom = top_in_order(cls_attention, d)
    kept = [gather_tokens(features, dom)]
    if c > 0:
        is_dom = torch.zeros(images, n, dtype=torch.bool, device=features.device).scatter_(1, dom, True)
        rest = is_dom.long().argsort(dim=1, stable=True)[:, : n - d]  # remaining patches, ascending
        step = max(1, (n - d) // c)
        picks = torch.arange(0, step * c, step, device=features.device)
        is_target = torch.zeros(n - d, dtype=torch.bool, device=features.device)
        is_target[picks] = True
        targets, others = rest[:, is_target], rest[:, ~is_target]
        k = torch.nn.functional.normalize(keys.float(), dim=-1)
        sim = gather_tokens(k, others) @ gather_tokens(k, targets).transpose(1, 2)  # (images, others, c)
        group = sim.argmax(-1)
        sums = gather_tokens(features, targets).float()
        sums = sums.scatter_add(1, group.unsqueeze(-1).expand(-1, -1, width), gather_tokens(features, others).float())
        counts = torch.ones(images, c, device=features.device).scatter_add(1, group, torch.ones_like(group, dtype=torch.float))
        kept.append((sums / counts.unsqueeze(-1)).to(features.dtype))
    return torch.cat(kept, dim=1), dom


@dataclasses.dataclass(frozen=True)
class VisionZip(VisualTokenPlugin):
    """VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

    Attributes:
        keep: visual tokens kept per image (share or count).
        dominant: share of the budget given to dominant tokens (the paper's 54 of 64: 0.84); the rest
            are contextual (merged) tokens.
        layer: layer whose CLS attention and keys are read (None: the layer that produces the visual
            features, as in the paper).
    """

    dominant: float = 54 / 64
    layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self, "dominant", 0.0, 1.0, lo_open=True)
        check_layer_field(self, "layer")

    def check_model(self, adapter) -> None:
        needs_cls(self, adapter)
        resolve_layer(self, "layer", adapter.vision_depth, adapter.feature_layer - 1)

    def select(self, ctx: VisionContext) -> torch.Tensor:
        layer = resolve_layer(self, "layer", ctx.adapter.vision_depth, ctx.adapter.feature_layer - 1)
        kept, _ = visionzip_merge(ctx.features, ctx.cls_attention(layer), ctx.keys(layer)[:, 1:], ctx.kept, self.dominant)
        return kept
