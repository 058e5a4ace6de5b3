"""Vision-side pruning on a stock ``LlavaForConditionalGeneration``.

Transformers checks that the number of ``<image>`` placeholders in ``input_ids`` equals the number of
visual features, so pruning the features means shrinking the placeholders too. The runtime wraps
three methods of the model *instance* (never the class):

- ``generate``: each run of ``n`` placeholders (one image) becomes a run of ``k`` (the attention
  mask and, for direct calls, the labels shrink with it; rows that lose different numbers of tokens
  are re-padded on the side the batch is padded on). The returned sequences get the caller's
  original prompt back in front of the generated tokens, so ``out[:, input_ids.shape[1]:]`` still
  reads the answer.
- ``forward``: the same for a direct call with ``pixel_values`` (its logits then cover the shortened
  sequence); inside ``generate`` it passes through.
- ``get_image_features`` of the inner ``LlavaModel``: runs the vision tower once with its hidden
  states, asks the plugin for the kept features, projects them.

Kept tokens are re-numbered contiguously (the language model sees a shorter prompt), as in HiPrune,
HiRED and VisionZip. With every token kept, every wrapper passes the call through untouched
(bit-identical outputs).
"""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..plugins.base import Installed
from ..plugins.runtime import ConcurrentCallError, InstanceWrap
from .context import VisionContext

if TYPE_CHECKING:  # pragma: no cover
    from ..plugins.runtime import CallTracker
    from .adapter import VlmAdapter
    from .base import VisualTokenPlugin


def shrink_placeholders(
    input_ids: torch.Tensor, image_token_id: int, n: int, k: int, *, pad_token_id: int,
    attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every run of ``n`` image placeholders becomes ``k`` (the first ``k`` of each image's run are
    kept; placeholders are all the same token). Returns the new ids, mask and labels."""
    is_img = input_ids == image_token_id
    counts = is_img.sum(1)
    if bool((counts % n != 0).any()):
        bad = [int(c) for c in counts.tolist() if c % n]
        raise ValueError(
            f"a prompt holds {bad[0]} image placeholder tokens, not a multiple of the {n} per image this model "
            f"expects: build inputs with the model's processor (one <image> per image)"
        )
    rank = (is_img.long().cumsum(1) - 1) % n
    keep = ~(is_img & (rank >= k))
    lengths = keep.sum(1)
    width = int(lengths.max())
    tensors = (input_ids, attention_mask, labels)
    if bool((lengths == width).all()):
        out = [None if t is None else t[keep].view(t.shape[0], width) for t in tensors]
        return out[0], out[1], out[2]
    # rows lose different numbers of tokens: re-pad on the batch's padding side
    left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    fills = (pad_token_id, 0, -100)
    out = []
    for t, fill in zip(tensors, fills):
        if t is None:
            out.append(None)
            continue
        rows = []
        for b in range(t.shape[0]):
            row = t[b][keep[b]]
            pad = row.new_full((width - row.shape[0],), fill)
            rows.append(torch.cat([pad, row] if left else [row, pad]))
        out.append(torch.stack(rows))
    return out[0], out[1], out[2]


class VisionPruning(Installed):
    """The wrappers on one model for one vision-side pruner (see the module doc)."""

    def __init__(self, adapter: "VlmAdapter", tracker: "CallTracker", plugin: "VisualTokenPlugin"):
        self.adapter, self.tracker, self.plugin = adapter, tracker, plugin
        self.n = adapter.tokens_per_image
        self.k = plugin.kept_tokens(adapter) + int(adapter.keeps_cls)
        self.passthrough = self.k >= self.n
        self._pending = False
        self._inside_generate = False
        self._owner: int | None = None
        self._guard = threading.Lock()
        self._last: dict[str, Any] = {}
        model = adapter.model
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._wraps = [
            InstanceWrap(adapter.inner, "get_image_features", self._make_features),
            InstanceWrap(model, "forward", self._make_forward),
            InstanceWrap(model, "generate", self._make_generate),
        ]

    # -- bookkeeping ------------------------------------------------------------------------------
    def _enter(self) -> None:
        with self._guard:
            if self._owner is not None:
                raise ConcurrentCallError(
                    f"{type(self.adapter.model).__name__} is already running a pruned call (thread {self._owner}); "
                    "the plugin keeps per-call state: one call at a time per model"
                )
            self._owner = threading.get_ident()

    def _leave(self) -> None:
        with self._guard:
            self._owner = None
            self._pending = False

    def reset(self) -> None:
        self._last = {}

    def stats(self) -> dict[str, Any]:
        return {"plugin": repr(self.plugin), "method": self.plugin.name,
                "visual_tokens_per_image": self.n, "kept_per_image": self.k, **self._last}

    def remove(self) -> None:
        for w in reversed(self._wraps):
            w.restore()
        self._wraps.clear()

    # -- the rewrite -------------------------------------------------------------------------------
    def _rewrite(self, kwargs: dict[str, Any]) -> int:
        """Shrink ``input_ids`` (and mask, labels) in ``kwargs`` in place; returns the old length."""
        ids = kwargs["input_ids"]
        if kwargs.get("position_ids") is not None:
            raise ValueError(f"{self.plugin.name}: position_ids given with pixel_values; the pruned prompt is "
                             "shorter, so let the model compute positions (drop position_ids)")
        pad = self.adapter.model.generation_config.pad_token_id
        pad = int(pad if pad is not None else 0)
        new_ids, mask, labels = shrink_placeholders(
            ids, self.adapter.image_token_id, self.n, self.k, pad_token_id=pad,
            attention_mask=kwargs.get("attention_mask"), labels=kwargs.get("labels"),
        )
        kwargs["input_ids"] = new_ids
        for name, value in (("attention_mask", mask), ("labels", labels)):
            if kwargs.get(name) is not None:
                kwargs[name] = value
        images = int((ids == self.adapter.image_token_id).sum()) // self.n
        self._last = {"images": images, "prompt_tokens": int(ids.shape[1]), "pruned_prompt_tokens": int(new_ids.shape[1]),
                      "visual_tokens": images * self.n, "kept_visual_tokens": images * self.k}
        return int(ids.shape[1])

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = dict(kwargs)
        for name, value in zip(self._forward_params, args):
            bound[name] = value
        return bound

    def _make_generate(self, original: Callable) -> Callable:
        def generate(*args: Any, **kwargs: Any) -> Any:
            if args:  # generate(inputs, ...): the first positional argument is the input ids
                kwargs = {"input_ids": args[0], **kwargs}
                args = args[1:]
            if "inputs" in kwargs:
                kwargs["input_ids"] = kwargs.pop("inputs")
            ids = kwargs.get("input_ids")
            if self.passthrough or kwargs.get("pixel_values") is None or ids is None or args:
                return original(*args, **kwargs)
            self._enter()
            try:
                old_len = self._rewrite(kwargs)
                new_len = kwargs["input_ids"].shape[1]
                self._pending = self._inside_generate = True
                out = original(**kwargs)
            finally:
                self._inside_generate = False
                self._leave()
            return self._restore_prompt(out, ids, new_len, old_len)

        return generate

    @staticmethod
    def _restore_prompt(out: Any, ids: torch.Tensor, new_len: int, old_len: int) -> Any:
        seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if not isinstance(seqs, torch.Tensor) or seqs.shape[0] % ids.shape[0]:
            return out
        prompt = ids.to(seqs.device).repeat_interleave(seqs.shape[0] // ids.shape[0], dim=0)
        full = torch.cat([prompt, seqs[:, new_len:]], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out["sequences"] = full
        return out

    def _make_forward(self, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.passthrough or self._inside_generate:
                return original(*args, **kwargs)
            bound = self._bind(args, kwargs)
            if bound.get("pixel_values") is None or bound.get("input_ids") is None:
                return original(*args, **kwargs)
            self._enter()
            try:
                self._rewrite(bound)
                self._pending = True
                return original(**bound)
            finally:
                self._leave()

        return forward

    def _make_features(self, original: Callable) -> Callable:
        def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self._pending:
                return original(pixel_values, *args, **kwargs)
            self._pending = False
            out = self.adapter.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            ctx = VisionContext(self.adapter, out.hidden_states, self.k - int(self.adapter.keeps_cls))
            kept = self.plugin.select(ctx)
            if self.adapter.keeps_cls:
                kept = torch.cat([ctx.cls, kept], dim=1)
            if kept.shape[1] != self.k:  # pragma: no cover - a plugin bug, never silently wrong
                raise RuntimeError(f"{self.plugin.name} returned {kept.shape[1]} tokens per image, expected {self.k}")
            projected = self.adapter.projector(kept)
            out.pooler_output = list(projected)
            return out

        return get_image_features


class CallStarts(Installed):
    """Starts a runtime call (``CallStarted``: every plugin's per-call state resets) when ``generate``
    runs, and when ``forward`` runs with ``pixel_values`` outside ``generate``."""

    def __init__(self, model: Any, tracker: "CallTracker"):
        self.tracker = tracker
        self._depth = 0
        self._wraps = [InstanceWrap(model, "forward", self._make_forward),
                       InstanceWrap(model, "generate", self._make_generate)]

    def _make_generate(self, original: Callable) -> Callable:
        def generate(*args: Any, **kwargs: Any) -> Any:
            self.tracker.new_call()
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return generate

    def _make_forward(self, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            pixels = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
            if self._depth == 0 and pixels is not None:
                self.tracker.new_call()
            return original(*args, **kwargs)

        return forward

    def remove(self) -> None:
        for w in reversed(self._wraps):
            w.restore()
        self._wraps.clear()
