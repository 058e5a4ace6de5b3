"""Attention maps recomputed from a layer's query/key projections.

SDPA and flash kernels never materialise attention probabilities, and switching a whole model to
eager attention to get them would slow every layer. The pruners need one or two maps: they recompute
them from the layer's input hidden states, its pre-attention norm and its q/k projections (the work
of one extra q/k projection and one ``tokens x tokens`` product per chosen layer).
"""

from __future__ import annotations

from typing import Any

import torch


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)  # (B, H, T, d)


def vision_attention(layer: Any, hidden: torch.Tensor, queries: slice | None = None) -> torch.Tensor:
    """Softmax attention probabilities (B, heads, queries, tokens) of a CLIP/SigLIP-style encoder
    layer (``layer_norm1`` then ``self_attn.q_proj``/``k_proj``, no mask), given the layer's *input*
    hidden states (B, tokens, width). ``queries`` restricts the query rows (``slice(0, 1)``: CLS)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    q_in = x if queries is None else x[:, queries]
    heads = attn.num_heads
    q = _heads(attn.q_proj(q_in), heads).float()
    k = _heads(attn.k_proj(x), heads).float()
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def vision_keys(layer: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's keys averaged over heads (B, tokens, head_dim), VisionZip's similarity space."""
    attn = layer.self_attn
    k = _heads(attn.k_proj(layer.layer_norm1(hidden)), attn.num_heads)
    return k.mean(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def last_query_attention(layer: Any, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities (B, heads, tokens) of the *last* position over every position, for a
    Llama-style decoder layer (``input_layernorm``, ``self_attn.q_proj``/``k_proj``, rotary embeddings
    ``(cos, sin)``, grouped keys), given the layer's input hidden states. ``attention_mask``: the
    additive or boolean 4D mask the layer receives (its last query row is used), or None."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    cfg = attn.config
    head_dim = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    b, t, _ = x.shape
    q = attn.q_proj(x[:, -1:]).view(b, 1, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos[:, :, -1:] + _rotate_half(q) * sin[:, :, -1:]
    k = k * cos + _rotate_half(k) * sin
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * head_dim**-0.5  # (B, H, T)
    if attention_mask is not None:
        row = attention_mask[:, :, -1, :t]
        if row.dtype == torch.bool:
            scores = scores.masked_fill(~row, float("-inf"))
        else:
            scores = scores + row.float()
    return torch.softmax(scores, dim=-1)
