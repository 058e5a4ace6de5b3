"""Quantized attention in the manner of SageAttention (Zhang et al. 2025): INT8 or FP8 Q·K with
per-block scales after smoothing K, and P·V in FP16, FP8 or FP32.

The math, top to bottom, for one head (``n`` query and ``m`` key tokens, head dim ``d``):

1. smooth K: ``K <- K - mean_tokens(K)``. Softmax is invariant to adding one vector to every key
   (each query's scores shift by a constant), and the channel-wise outlier of K, shared by all
   tokens, leaves the quantization range.
2. quantize Q per block of ``block_q`` tokens and K per block of ``block_k`` tokens:
   ``delta = max|x_block| / qmax`` (qmax 127 for INT8, 448 for FP8 e4m3), ``x_hat = round(x / delta)``
   (INT8, clamped to +-127) or the nearest e4m3 value (FP8).
3. ``S = (Q_hat K_hat^T) * delta_Q delta_K^T * scale``; ``P~ = exp(S - rowmax S)``, ``l = rowsum P~``.
4. ``O = (P~ V) / l`` with P~ and V in the ``pv_format``: ``"fp32"`` exact, ``"fp16"`` both rounded to
   FP16 (accumulated in FP32), ``"fp8_e4m3"`` P~ scaled by 448 (it lies in [0, 1]) and V per channel
   (``delta_V = max_tokens|V| / 448``), both to e4m3.

:func:`quantized_attention` computes exactly this (fake quantization in float32, the integer
products are exact in float32 for ``d <= 1040``), in query chunks so that long sequences fit in
memory. The INT8 scores can also be computed with integer matrix products (``impl="int8"``,
``torch._int_mm``): the same numbers, bit for bit; ``"auto"`` uses it for INT8 on CPU (0.67x the
float path's time in one measurement at 4,096 tokens, 0.98x in another). Neither is faster than exact attention
on a CPU (fused SDPA): on CPU this kernel shows the fidelity of quantized attention, not its speed
(benchmarks/RESULTS.md, "Attention kernels").
"""

from __future__ import annotations

import torch

from .common import enter, key_padding, pad_tokens, query_chunks

#: the largest code of each Q/K format: INT8 +-127, FP8 e4m3 +-448
QK_FORMATS = {"int8": 127.0, "fp8_e4m3": 448.0}
PV_FORMATS = ("fp16", "fp8_e4m3", "fp32")
FP8_MAX = 448.0
IMPLS = ("auto", "reference", "int8")
#: bytes of float32 scores per query chunk (bounds memory at long sequences)
CHUNK_BYTES = 1 << 28


def _fp8(x: torch.Tensor) -> torch.Tensor:
    """The nearest float8 e4m3 value, back in float32 (values beyond +-448 saturate)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def quantize_blocks(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block quantization of ``x`` (batch, heads, tokens, d), float32.

    Returns the codes (float32 holding the integer or e4m3 values) and each token's scale delta,
    shape (batch, heads, tokens, 1): ``x ~ codes * delta``. An all-zero block gets delta 1.
    """
    b, h, n, d = x.shape
    blocks = pad_tokens(x, block).view(b, h, -1, block, d)
    amax = blocks.abs().amax(dim=(-2, -1), keepdim=True)
    delta = torch.where(amax > 0, amax / QK_FORMATS[fmt], torch.ones_like(amax))
    scaled = blocks / delta
    codes = scaled.round().clamp(-127, 127) if fmt == "int8" else _fp8(scaled)
    nb = blocks.shape[2]
    codes = codes.view(b, h, nb * block, d)[:, :, :n]
    delta = delta.expand(b, h, nb, block, 1).reshape(b, h, nb * block, 1)[:, :, :n]
    return codes, delta


def _int8_scores(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
    """``qc @ kc^T`` through int8 x int8 -> int32 products, per (batch, head); float32 result."""
    b, h, n, d = qc.shape
    qi = qc.to(torch.int8).reshape(b * h, n, d)
    ki = kc.to(torch.int8).reshape(b * h, -1, d)
    out = torch.stack([torch._int_mm(qi[i], ki[i].t().contiguous()) for i in range(b * h)])
    return out.view(b, h, n, -1).to(torch.float32)


def _pv(p: torch.Tensor, v: torch.Tensor, pv_format: str) -> torch.Tensor:
    if pv_format == "fp32":
        return p @ v
    if pv_format == "fp16":
        return p.half().float() @ v.half().float()
    delta_v = v.abs().amax(dim=-2, keepdim=True) / FP8_MAX
    delta_v = torch.where(delta_v > 0, delta_v, torch.ones_like(delta_v))
    return (_fp8(p * FP8_MAX) @ _fp8(v / delta_v)) * (delta_v / FP8_MAX)


def check_formats(qk_format: str, pv_format: str, impl: str = "auto") -> None:
    if qk_format not in QK_FORMATS:
        raise ValueError(f"qk_format must be one of {tuple(QK_FORMATS)}, got {qk_format!r}")
    if pv_format not in PV_FORMATS:
        raise ValueError(f"pv_format must be one of {PV_FORMATS}, got {pv_format!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "int8" and qk_format != "int8":
        raise ValueError("impl='int8' computes INT8 scores; it needs qk_format='int8'")


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    qk_format: str = "int8",
    pv_format: str = "fp16",
    block_q: int = 128,
    block_k: int = 64,
    smooth_k: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """SageAttention-style quantized attention, SDPA's layout and arguments.

    Args:
        q, k, v: (batch, heads, tokens, head_dim), float32/bfloat16/float16, one dtype.
        attn_mask: a key-padding mask (the same for every query: bool ``(batch, 1, 1, keys)``, True
            keeps, or additive 0 / -inf, any broadcastable shape) is applied inside the kernel:
            hidden keys get no weight and do not widen the quantization scales. Any other mask, and
            ``dropout_p``/``is_causal`` (SDPA's), get exact attention instead (logged once per reason).
        scale: softmax scale (default 1/sqrt(head_dim)).
        qk_format: ``"int8"`` (default) or ``"fp8_e4m3"``: the codes of Q and K.
        pv_format: ``"fp16"`` (default), ``"fp8_e4m3"`` or ``"fp32"``: P and V in the product P·V.
        block_q, block_k: tokens per quantization block of Q (128) and K (64), SageAttention's.
        smooth_k: subtract the mean key over tokens first (True; the output is unchanged in exact
            arithmetic, the quantization error shrinks).
        impl: ``"auto"`` (INT8 on CPU: ``"int8"``, else ``"reference"``), ``"reference"`` (float32
            products of the codes) or ``"int8"`` (integer products; same result).

    Returns:
        the attention output (batch, heads, tokens, head_dim of v) in the input dtype.
    """
    check_formats(qk_format, pv_format, impl)
    keep = None
    if attn_mask is not None and q.ndim == 4 and k.ndim == 4:
        keep = key_padding(attn_mask, q, k)
        if keep is not None:
            attn_mask = None
    sm, fallback = enter("quantized_attention", q, k, v, block_q, block_k, scale, attn_mask, dropout_p, is_causal)
    if fallback is not None:
        return fallback
    qf, kf, vf = q.float(), k.float(), v.float()
    tokens = None
    if keep is not None:  # hidden keys and values become zero: no weight, no say in the block scales
        tokens = keep.transpose(-2, -1)  # (b|1, h|1, keys, 1)
        zero = torch.zeros((), dtype=kf.dtype, device=kf.device)
        kf, vf = torch.where(tokens, kf, zero), torch.where(tokens, vf, zero)
    if smooth_k:
        if tokens is None:
            kf = kf - kf.mean(dim=-2, keepdim=True)
        else:  # the mean of the kept keys; hidden ones stay zero
            mean = kf.sum(dim=-2, keepdim=True) / tokens.sum(dim=-2, keepdim=True).clamp(min=1)
            kf = torch.where(tokens, kf - mean, zero)
    qc, dq = quantize_blocks(qf, block_q, qk_format)
    kc, dk = quantize_blocks(kf, block_k, qk_format)
    dk_t = dk.transpose(-2, -1) * sm
    kc_t = kc.transpose(-2, -1)
    use_int8 = impl == "int8" or (impl == "auto" and qk_format == "int8" and q.device.type == "cpu")
    b, h, n, _ = q.shape
    chunk = max(1, CHUNK_BYTES // max(1, 4 * b * h * k.shape[2]))
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32, device=q.device)
    for rows in query_chunks(n, chunk):
        raw = _int8_scores(qc[:, :, rows], kc) if use_int8 else qc[:, :, rows] @ kc_t
        s = raw * dq[:, :, rows] * dk_t
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        out[:, :, rows] = _pv(p, vf, pv_format) / p.sum(dim=-1, keepdim=True)
    return out.to(q.dtype)
