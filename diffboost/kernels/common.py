"""What every attention kernel shares: input checks, the exact fallback, and block helpers.

Layout and semantics are those of :func:`torch.nn.functional.scaled_dot_product_attention`:
``(batch, heads, tokens, head_dim)`` query, key and value, an optional softmax ``scale`` (default
``1 / sqrt(head_dim)``). A kernel that cannot take an input (an attention mask, causal attention,
dropout) answers with exact attention and logs that once per reason; it is never silently wrong.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger("diffboost")

#: input dtypes the kernels take (computed in float32 inside)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: head dimensions the kernels take
MAX_HEAD_DIM = 512

_warned: set[str] = set()


class KernelInputError(ValueError):
    """Inputs an attention kernel cannot take at all (wrong rank, shapes or dtype); the message says what is allowed."""


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    """Shapes and dtypes: 4-D ``(batch, heads, tokens, head_dim)``, same batch/heads, same dtype."""
    for label, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise KernelInputError(f"{name}: {label} must be a 4-D tensor (batch, heads, tokens, head_dim), "
                                   f"got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in DTYPES:
            raise KernelInputError(f"{name}: {label} has dtype {t.dtype}; allowed: float32, bfloat16, float16")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise KernelInputError(f"{name}: batch and heads must match and key/value must have the same tokens; got "
                               f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} (grouped-query "
                               "attention: repeat the key/value heads first)")
    if q.shape[-1] != k.shape[-1]:
        raise KernelInputError(f"{name}: query and key head_dim differ ({q.shape[-1]} vs {k.shape[-1]})")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM or not 1 <= v.shape[-1] <= MAX_HEAD_DIM:
        raise KernelInputError(f"{name}: head_dim must be in [1, {MAX_HEAD_DIM}], got {q.shape[-1]}/{v.shape[-1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise KernelInputError(f"{name}: query, key and value must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise KernelInputError(f"{name}: no tokens (query {q.shape[2]}, key {k.shape[2]})")


def check_block(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise KernelInputError(f"{what} must be an integer in [1, 4096], got {value!r}")
    return value


def warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning(message)


def unsupported_reason(attn_mask: torch.Tensor | None, is_causal: bool, dropout_p: float) -> str | None:
    """Why a kernel must fall back to exact attention for these arguments (None: it need not)."""
    if attn_mask is not None:
        return "an attention mask"
    if is_causal:
        return "causal attention"
    if dropout_p:
        return "dropout"
    return None


#: additive mask values at or below this hide a key (diffusers builds masks with -10000 or finfo.min)
HIDDEN = -1e4


def key_padding(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The keys a key-padding mask keeps, as a bool ``(batch or 1, heads or 1, 1, keys)`` tensor; None
    when ``attn_mask`` is not one (it differs between queries, or an additive mask holds values other
    than 0 and "hidden", such as position biases).

    A bool mask keeps True; an additive float mask keeps 0 and hides values <= :data:`HIDDEN`. Checking
    a float mask's values reads one number back from the device."""
    m = attn_mask
    if m.dim() > 4:
        return None
    while m.dim() < 4:
        m = m.unsqueeze(0)
    b, h, n, keys = m.shape
    if keys != k.shape[-2] or n != 1 or b not in (1, q.shape[0]) or h not in (1, q.shape[1]):
        return None
    if m.dtype == torch.bool:
        return m
    if not m.is_floating_point():
        return None
    keep = m > HIDDEN
    if torch.where(keep, m, torch.zeros((), dtype=m.dtype, device=m.device)).abs().amax().item() != 0:
        return None
    return keep


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def enter(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int,
          scale: float | None, attn_mask: torch.Tensor | None, dropout_p: float,
          is_causal: bool) -> tuple[float, torch.Tensor | None]:
    """The checks every kernel starts with. Returns the softmax scale, and exact attention's output
    when the kernel cannot take these arguments (logged once per reason), else None."""
    check_qkv(q, k, v, name)
    check_block(block_q, "block_q")
    check_block(block_k, "block_k")
    sm = softmax_scale(q, scale)
    why = unsupported_reason(attn_mask, is_causal, dropout_p)
    if why is None:
        return sm, None
    warn_once(f"{name}:{why}", f"{name} does not take {why}; computing exact attention instead (logged once)")
    return sm, exact(q, k, v, attn_mask, dropout_p, is_causal, scale)


def softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise KernelInputError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def pad_tokens(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (..., tokens, d) zero-padded along tokens to a multiple of ``block``."""
    extra = (-x.shape[-2]) % block
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def block_counts(tokens: int, block: int, device: torch.device) -> torch.Tensor:
    """Valid tokens in each block (the last may be partial), shape (blocks,)."""
    n = math.ceil(tokens / block)
    counts = torch.full((n,), block, device=device, dtype=torch.float32)
    counts[-1] = tokens - block * (n - 1)
    return counts


def query_chunks(tokens: int, chunk: int):
    """``slice`` objects covering ``range(tokens)`` in chunks (bounds the (q, k) score memory)."""
    for start in range(0, tokens, chunk):
        yield slice(start, min(tokens, start + chunk))
