"""What the visual-token plugins need to know about a Transformers vision-language model.

A model is recognised by its class (``LlavaForConditionalGeneration`` and subclasses: the LLaVA-1.5
layout, one fixed-size image per ``<image>`` run). For it the adapter records the vision tower and its
encoder layers, the layer whose hidden states become the visual features, whether those keep the CLS
token, the patch grid, the projector, the language model's decoder layers and the placeholder token.
LLaVA-NeXT (tiled images, ``image_newline``) and Qwen2-VL (merged patches, 3D RoPE) are refused with a
clear message: their token layouts need their own surgery.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch

from ..plugins.adapters import UnsupportedPipelineError

#: model classes the adapter knows, with what it does not support yet
SUPPORTED = ("LlavaForConditionalGeneration",)
REFUSED = {
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT tiles an image into crops with image_newline tokens",
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision tiles images with image_newline tokens",
    "Qwen2VLForConditionalGeneration": "Qwen2-VL merges patches and uses 3D rotary positions",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL merges patches and uses 3D rotary positions",
}


def is_vlm(obj: Any) -> bool:
    """Does ``obj`` look like a Transformers vision-language model (rather than a Diffusers pipeline)?"""
    if not isinstance(obj, torch.nn.Module):
        return False
    names = {c.__name__ for c in type(obj).__mro__}
    return bool(names & (set(SUPPORTED) | set(REFUSED))) or hasattr(obj, "get_image_features")


@dataclasses.dataclass
class VlmAdapter:
    """The parts of one LLaVA-style model (found once, at ``apply``)."""

    model: Any
    inner: Any  # LlavaModel (vision tower, projector, language model)
    vision_tower: Any
    vision_layers: Any  # the vision encoder's layer list
    feature_layer: int  # index into the vision tower's hidden_states (non-negative)
    keeps_cls: bool  # "full" strategy: the CLS token is one of the features
    grid: tuple[int, int]  # patch rows, columns
    projector: Any
    language_layers: Any
    image_token_id: int

    @classmethod
    def of(cls, model: Any) -> "VlmAdapter":
        names = [c.__name__ for c in type(model).__mro__]
        for name, why in REFUSED.items():
            if name in names:
                raise UnsupportedPipelineError(
                    f"{type(model).__name__} is not supported yet ({why}); diffboost's visual-token plugins "
                    f"support {', '.join(SUPPORTED)} (the LLaVA-1.5 layout)"
                )
        if not any(n in names for n in SUPPORTED):
            raise UnsupportedPipelineError(
                f"{type(model).__name__} is not a vision-language model diffboost knows; supported: "
                f"{', '.join(SUPPORTED)} (Diffusers pipelines take the other plugins)"
            )
        inner = model.model
        config = model.config
        layer = config.vision_feature_layer
        strategy = config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise UnsupportedPipelineError(
                f"{type(model).__name__}: vision_feature_layer={layer!r} concatenates several layers; the "
                "visual-token plugins support a single feature layer"
            )
        vision = inner.vision_tower
        vcfg = vision.config
        encoder = getattr(getattr(vision, "vision_model", vision), "encoder", None)
        layers = getattr(encoder, "layers", None)
        if layers is None:
            raise UnsupportedPipelineError(
                f"{type(model).__name__}: its vision tower {type(vision).__name__} has no encoder.layers"
            )
        depth = len(layers)
        feature_layer = layer if layer >= 0 else depth + 1 + layer
        if not 1 <= feature_layer <= depth:
            raise UnsupportedPipelineError(f"vision_feature_layer={layer} is outside the vision tower's {depth} layers")
        side = vcfg.image_size // vcfg.patch_size
        return cls(
            model=model, inner=inner, vision_tower=vision, vision_layers=layers, feature_layer=feature_layer,
            keeps_cls=strategy == "full", grid=(side, side), projector=inner.multi_modal_projector,
            language_layers=inner.language_model.layers, image_token_id=int(config.image_token_id),
        )

    @property
    def patches(self) -> int:
        """Patch tokens per image (the grid)."""
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens (placeholders) per image without pruning."""
        return self.patches + int(self.keeps_cls)

    @property
    def vision_depth(self) -> int:
        return len(self.vision_layers)

    def call_starts(self, tracker: Any) -> Any:
        """Installed last (outermost): starts a call on the runtime at every ``generate`` and every
        direct ``forward`` with images."""
        from .runtime import CallStarts

        return CallStarts(self.model, tracker)

    # the runtime's handle iterates over denoisers; a VLM has none
    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def describe(self) -> dict[str, Any]:
        return {
            "model": type(self.model).__name__,
            "family": "llava",
            "visual_tokens_per_image": self.tokens_per_image,
            "grid": list(self.grid),
            "vision_layers": self.vision_depth,
            "feature_layer": self.feature_layer,
            "language_layers": len(self.language_layers),
        }
