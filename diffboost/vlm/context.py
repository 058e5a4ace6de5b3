"""What a vision-side pruner sees: one batch of images as the vision tower saw it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import VlmAdapter


class VisionContext:
    """One batch of images as the vision tower saw it. Attention maps are recomputed on request and
    cached for the call (:mod:`diffboost.vlm.attention`)."""

    def __init__(self, adapter: "VlmAdapter", hidden_states: tuple[torch.Tensor, ...], kept: int):
        self.adapter = adapter
        self.hidden_states = hidden_states
        #: tokens to return per image
        self.kept = kept
        self.grid = adapter.grid
        self._cache: dict[Any, torch.Tensor] = {}

    @property
    def features(self) -> torch.Tensor:
        """The feature layer's patch tokens (images, patches, width), CLS dropped."""
        return self.hidden_states[self.adapter.feature_layer][:, 1:]

    @property
    def cls(self) -> torch.Tensor:
        """The feature layer's CLS token (images, 1, width)."""
        return self.hidden_states[self.adapter.feature_layer][:, :1]

    def attention(self, layer: int) -> torch.Tensor:
        """Probabilities (images, heads, tokens, tokens) of vision encoder layer ``layer`` (0-based;
        token 0 is CLS)."""
        from .attention import vision_attention

        key = ("all", layer)
        if key not in self._cache:
            self._cache[key] = vision_attention(self.adapter.vision_layers[layer], self.hidden_states[layer])
        return self._cache[key]

    def cls_attention(self, layer: int) -> torch.Tensor:
        """CLS -> patch attention of ``layer``, averaged over heads (images, patches)."""
        from .attention import vision_attention

        key = ("cls", layer)
        if key not in self._cache:
            if ("all", layer) in self._cache:
                probs = self._cache[("all", layer)][:, :, :1]
            else:
                probs = vision_attention(self.adapter.vision_layers[layer], self.hidden_states[layer], slice(0, 1))
            self._cache[key] = probs[:, :, 0, 1:].mean(1)
        return self._cache[key]

    def received_attention(self, layer: int) -> torch.Tensor:
        """Attention each patch receives in ``layer``, averaged over heads and over all queries
        (images, patches)."""
        return self.attention(layer)[..., 1:].mean(dim=(1, 2))

    def keys(self, layer: int) -> torch.Tensor:
        """Keys of ``layer`` averaged over heads (images, tokens, head_dim)."""
        from .attention import vision_keys

        key = ("keys", layer)
        if key not in self._cache:
            self._cache[key] = vision_keys(self.adapter.vision_layers[layer], self.hidden_states[layer])
        return self._cache[key]
