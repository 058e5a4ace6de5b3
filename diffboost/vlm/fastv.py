"""FastV (training-free, inside the language model; shared/ANCHORS.md section 5).

During prefill, the attention of the prompt's last token over the image tokens in decoder layer
``K - 1`` (0-based; recomputed from its q/k projections and rotary embeddings) ranks the image
tokens; from layer ``K`` on, only the top ones stay in the sequence. Text tokens all stay, and every
kept token keeps its original position (its rotary embedding). Layers before ``K`` see, and cache,
every token; layers from ``K`` on cache only the kept ones, so decoding is cheaper there too.

Surgery, all on the model instance: the inner ``LlavaModel.forward`` is wrapped to see which
positions hold image tokens; forward pre-hooks on decoder layers ``K - 1 ..`` score, then drop
tokens from the hidden states and gather the rotary embeddings, position ids and attention mask
(during decoding, the mask's key columns of the dropped positions). Needs the default dynamic KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..plugins.base import Installed, check_int
from ..plugins.runtime import InstanceWrap
from .attention import last_query_attention
from .base import VisualTokenPlugin, budget

if TYPE_CHECKING:  # pragma: no cover
    from ..plugins.runtime import CallTracker
    from .adapter import VlmAdapter


def fastv_keep_positions(scores: torch.Tensor, is_image: torch.Tensor, kept_images: int) -> torch.Tensor:
    """Positions kept per row (rows, kept), ascending: every non-image position plus the
    ``kept_images`` image positions with the highest ``scores`` (rows, positions)."""
    masked = scores.float().masked_fill(~is_image, float("-inf"))
    top = masked.topk(kept_images, dim=-1).indices
    keep = (~is_image).clone().scatter_(1, top, True)
    width = int(keep.sum(1)[0])
    return keep.nonzero()[:, 1].view(keep.shape[0], width)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered at per-row positions ``index`` (rows, kept) along ``dim`` (rows first)."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    shape = [index.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = index.shape[1]
    idx = index.view(shape).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, idx)


class FastVPruning(Installed):
    """The wrapper and hooks of one :class:`FastV` on one model."""

    def __init__(self, adapter: "VlmAdapter", tracker: "CallTracker", plugin: "FastV"):
        self.adapter, self.tracker, self.plugin = adapter, tracker, plugin
        self.layer = plugin.resolved_layer(len(adapter.language_layers))
        self.state: dict[str, Any] = {}
        self._last: dict[str, Any] = {}
        self._wrap = InstanceWrap(adapter.inner, "forward", self._make_forward)
        self._hooks = [adapter.language_layers[self.layer - 1].register_forward_pre_hook(self._score, with_kwargs=True)]
        for i in range(self.layer, len(adapter.language_layers)):
            self._hooks.append(adapter.language_layers[i].register_forward_pre_hook(self._prune, with_kwargs=True))

    def reset(self) -> None:
        self._last = {}

    def stats(self) -> dict[str, Any]:
        return {"plugin": repr(self.plugin), "method": "FastV", "layer": self.layer, **self._last}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._wrap.restore()
        self.state = {}

    def _make_forward(self, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.shape[1] > 1:
                is_image = ids == self.adapter.image_token_id
                counts = is_image.sum(1)
                if bool((counts > 0).any()):
                    if bool((counts != counts[0]).any()):
                        raise ValueError("FastV needs the same number of images in every row of a batch")
                    per_image = int(counts[0])
                    kept = budget(self.plugin.keep, per_image)
                    self.state = {"is_image": is_image, "length": ids.shape[1], "kept_images": kept, "keep": None}
                    self._last = {"image_tokens": per_image, "kept_image_tokens": kept, "prompt_tokens": ids.shape[1],
                                  "tokens_after_layer": ids.shape[1] - per_image + kept}
                else:
                    self.state = {}
            return original(*args, **kwargs)

        return forward

    def _active(self) -> bool:
        s = self.state
        return bool(s) and s["kept_images"] < int(s["is_image"].sum(1)[0])

    def _score(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        s = self.state
        if not self._active() or hidden.shape[1] != s["length"]:
            return None
        probs = last_query_attention(module, hidden, kwargs["position_embeddings"], _tensor_mask(kwargs.get("attention_mask")))
        s["keep"] = fastv_keep_positions(probs.mean(1), s["is_image"].to(hidden.device), s["kept_images"])
        return None

    def _prune(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        s = self.state
        keep = s.get("keep") if s else None
        if keep is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        length = s["length"]
        mask = _tensor_mask(kwargs.get("attention_mask"))
        if hidden.shape[1] == length:  # prefill, first pruned layer: drop the tokens
            hidden = _gather_rows(hidden, keep, 1)
        if hidden.shape[1] == keep.shape[1] and kwargs.get("position_embeddings") is not None and \
                kwargs["position_embeddings"][0].shape[-2] == length:  # prefill: gather positions and mask
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (_gather_rows(cos, keep, 1), _gather_rows(sin, keep, 1))
            if isinstance(kwargs.get("position_ids"), torch.Tensor) and kwargs["position_ids"].shape[-1] == length:
                kwargs["position_ids"] = _gather_rows(kwargs["position_ids"], keep, 1)
            if mask is not None:
                mask = _gather_rows(_gather_rows(mask, keep, 2), keep, 3)
                kwargs["attention_mask"] = mask
        elif mask is not None and mask.shape[-1] >= length:  # decoding: drop the pruned key columns
            later = torch.arange(length, mask.shape[-1], device=mask.device).expand(keep.shape[0], -1)
            kwargs["attention_mask"] = _gather_rows(mask, torch.cat([keep.to(mask.device), later], 1), 3)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


def _tensor_mask(mask: Any) -> torch.Tensor | None:
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    raise TypeError(f"FastV works with tensor attention masks (sdpa or eager attention), got {type(mask).__name__}; "
                    "load the model with attn_implementation='sdpa'")


@dataclasses.dataclass(frozen=True)
class FastV(VisualTokenPlugin):
    """FastV: after decoder layer ``layer``, keep only the image tokens the last prompt token attends
    to most (original positions kept).

    Attributes:
        keep: image tokens kept per prompt after the pruning layer (a share of them, or a count).
        layer: the paper's K: layers ``0 .. K-1`` see every token, the attention of layer ``K - 1``
            ranks them (default 2, the paper's K=2).
    """

    layer: int = 2
    stage: ClassVar[str] = "language"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "layer", 1)

    def resolved_layer(self, depth: int) -> int:
        if self.layer >= depth:
            raise ValueError(f"FastV.layer={self.layer} leaves no layer to prune in a {depth}-layer language model "
                             f"(allowed: 1..{depth - 1})")
        return self.layer

    def check_model(self, adapter: "VlmAdapter") -> None:
        self.resolved_layer(len(adapter.language_layers))
        impl = getattr(adapter.model.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"FastV supports sdpa and eager attention, the model uses {impl!r}")

    def kept_tokens(self, adapter: "VlmAdapter") -> int:
        return adapter.tokens_per_image  # the vision side is untouched

    def install(self, adapter: "VlmAdapter", tracker: "CallTracker") -> list[Installed]:
        self.check_model(adapter)
        if self.never_skips():
            return []
        return [FastVPruning(adapter, tracker, self)]
