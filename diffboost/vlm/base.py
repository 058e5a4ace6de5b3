"""The common part of the visual-token plugins: the token budget, and what a vision-side pruner sees.

A vision-side pruner (HiPrune, HiRED, VisionZip, Downsample) gets a :class:`VisionContext` (the
vision tower's hidden states of one batch of images, the patch grid, helpers that recompute the
attention maps it asks for) and returns the features the language model will see: ``(images, kept,
width)``, *before* the projector. Kept patch tokens stay in spatial order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..plugins.base import Installed, Plugin, PluginKind, check_int
from .context import VisionContext

if TYPE_CHECKING:  # pragma: no cover
    from ..plugins.runtime import CallTracker
    from .adapter import VlmAdapter


def check_keep(obj: Any) -> None:
    """``keep``: a share of the visual tokens in (0, 1] (float) or a token count >= 1 (int)."""
    keep = obj.keep
    name = f"{type(obj).__name__}.keep"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be a share of the visual tokens (a float in (0, 1]) or a token count "
                        f"(an int >= 1), got {type(keep).__name__} ({keep!r})")
    if isinstance(keep, float):
        if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
            raise ValueError(f"{name}={keep} is out of range; allowed: a share in (0, 1] or a token count >= 1")
    elif keep < 1:
        raise ValueError(f"{name}={keep} is out of range; allowed: a token count >= 1 or a share in (0, 1]")


def budget(keep: float | int, tokens: int) -> int:
    """Tokens kept of ``tokens`` for ``keep`` (a share rounds to the nearest count, at least 1)."""
    if isinstance(keep, float):
        return max(1, min(tokens, int(math.floor(keep * tokens + 0.5))))
    return max(1, min(tokens, int(keep)))


def resolve_layer(obj: Any, field: str, depth: int, default: int) -> int:
    """A layer index field (``None`` = ``default``; negative counts from the end) as 0..depth-1."""
    value = getattr(obj, field)
    if value is None:
        return default
    index = value if value >= 0 else depth + value
    if not 0 <= index < depth:
        raise ValueError(f"{type(obj).__name__}.{field}={value} is outside the vision tower's {depth} layers "
                         f"(allowed: 0..{depth - 1} or -{depth}..-1)")
    return index


def check_layer_field(obj: Any, field: str) -> None:
    if getattr(obj, field) is not None:
        check_int(obj, field)


def gather_tokens(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``features[b, index[b]]`` for (images, tokens, width) and (images, kept) indices."""
    return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def top_in_order(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, in ascending (spatial) order."""
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


@dataclasses.dataclass(frozen=True)
class VisualTokenPlugin(Plugin):
    """Base of the plugins that cut the visual tokens a VLM's language model sees.

    Attributes:
        keep: the visual tokens kept per image: a share in (0, 1] (0.25 keeps 64 of 256) or a count
            (an int >= 1). 1.0 keeps every token and leaves the model's outputs bit-identical.
    """

    keep: float | int = 0.25
    kind: ClassVar[PluginKind] = PluginKind.VLM
    #: "vision": prunes the vision features before the language model; "language": inside it
    stage: ClassVar[str] = "vision"

    def __post_init__(self) -> None:
        check_keep(self)

    def never_skips(self) -> bool:
        return isinstance(self.keep, float) and self.keep == 1.0

    def kept_tokens(self, adapter: "VlmAdapter") -> int:
        """Visual tokens per image the language model will see."""
        return budget(self.keep, adapter.patches)

    def check_model(self, adapter: "VlmAdapter") -> None:
        """Refuse a model this configuration cannot work on (before any work)."""

    def select(self, ctx: VisionContext) -> torch.Tensor:  # pragma: no cover - interface
        """The kept features (images, ctx.kept, width), before the projector."""
        raise NotImplementedError

    def install(self, adapter: "VlmAdapter", tracker: "CallTracker") -> list[Installed]:
        from .runtime import VisionPruning

        self.check_model(adapter)
        return [VisionPruning(adapter, tracker, self)]


def needs_cls(plugin: Any, adapter: "VlmAdapter") -> None:
    """Refuse a vision tower without a CLS token (CLIP's ``embeddings.class_embedding``; SigLIP has
    none) for methods that read CLS attention."""
    tower = getattr(adapter.vision_tower, "vision_model", adapter.vision_tower)
    if getattr(getattr(tower, "embeddings", None), "class_embedding", None) is None:
        raise ValueError(f"{type(plugin).__name__} reads the CLS token's attention; the vision tower "
                         f"{type(adapter.vision_tower).__name__} has none (use HiPrune or Downsample)")
