"""Block-sparse attention in the manner of SpargeAttn (Zhang et al. 2025): predict from pooled
queries and keys which key blocks matter to each query block, and compute only those.

The selection, for each head (``block_q`` query and ``block_k`` key tokens per block):

1. pool: ``q_i`` = mean of query block i, ``k_j`` = mean of key block j.
2. self-similarity guard: ``sim(block) = |sum_t x_t / |x_t||^2 / n^2``, the mean pairwise cosine of
   its tokens. A pooled vector stands for its block only when the tokens agree, so a query block
   with ``sim < sim_threshold`` attends to every key block (a dense row), and a key block with
   ``sim < sim_threshold`` is kept for every query block (a dense column).
3. ``P_hat = softmax_j(q_i k_j^T * scale + log n_j)`` (``n_j`` the block's tokens: the pooled score
   of a block stands for n_j keys); per row, keep the fewest blocks, most probable first, whose
   probabilities sum to ``cdf_threshold`` (tau), or the ``topk`` fraction of blocks when given.

Then exact attention over the kept blocks only (softmax over the kept keys). With
``order="tiles"`` and a token grid ``(frames, height, width)``, tokens are first reordered so that
each block is a spatially (and temporally) compact tile instead of a run of rows, which makes blocks
more self-similar and the selection sharper on images and video; the output is put back in the
original order.

Four implementations, the same numbers up to float rounding: ``"reference"`` (dense scores with
the dropped blocks masked; the tests' yardstick), ``"blocks"`` (the default: one fused
``scaled_dot_product_attention`` per query block over the key tokens it keeps, gathered; the work is
the kept share of the dense product, plus a Python loop over (batch, head, query block)),
``"gather"`` (groups of query blocks over the union of their kept blocks, masked; pure tensor ops,
slower on CPU than the fused kernel) and, on request, ``"flex"`` (``torch.nn.attention.flex_attention``
with a ``BlockMask``, compiled: skips the dropped blocks on CPU and CUDA; the first call compiles
for tens of seconds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import block_counts, enter, exact, pad_tokens, query_chunks, softmax_scale

IMPLS = ("auto", "reference", "gather", "blocks", "flex")
ORDERS = ("rows", "tiles")
#: ``impl="auto"`` computes exact attention when the selection keeps at least this share of the
#: query-key pairs (the block loop would be slower than one fused call, and less exact)
DENSE_SHARE = 0.85
#: query blocks attended per gathered group in the "gather" implementation
GROUP_BLOCKS = 8


def check_selection(cdf_threshold: float, topk: float | None, sim_threshold: float) -> None:
    if isinstance(cdf_threshold, bool) or not isinstance(cdf_threshold, (int, float)) or not 0 < cdf_threshold <= 1:
        raise ValueError(f"cdf_threshold must be in (0, 1], got {cdf_threshold!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0 < topk <= 1):
        raise ValueError(f"topk must be a fraction in (0, 1] or None, got {topk!r}")
    if isinstance(sim_threshold, bool) or not isinstance(sim_threshold, (int, float)) or not -1 <= sim_threshold <= 1:
        raise ValueError(f"sim_threshold must be in [-1, 1], got {sim_threshold!r}")


def _pool(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block means, block self-similarity and tokens per block of ``x`` (b, h, n, d)."""
    b, h, n, d = x.shape
    counts = block_counts(n, block, x.device)
    blocks = pad_tokens(x, block).view(b, h, -1, block, d)
    mean = blocks.sum(dim=-2) / counts[:, None]
    unit = blocks / blocks.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = unit.sum(dim=-2).pow(2).sum(dim=-1) / counts.pow(2)
    return mean, sim, counts


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    cdf_threshold: float = 0.95,
    topk: float | None = None,
    sim_threshold: float = 0.5,
    scale: float | None = None,
) -> torch.Tensor:
    """The kept (query block, key block) pairs: bool (batch, heads, query blocks, key blocks)."""
    check_selection(cdf_threshold, topk, sim_threshold)
    sm = softmax_scale(q, scale)
    qm, q_sim, _ = _pool(q.float(), block_q)
    km, k_sim, k_counts = _pool(k.float(), block_k)
    logits = (qm @ km.transpose(-2, -1)) * sm + k_counts.log()
    probs = logits.softmax(dim=-1)
    nk = probs.shape[-1]
    order = probs.argsort(dim=-1, descending=True)
    if topk is not None:
        keep_sorted = torch.arange(nk, device=q.device) < max(1, math.ceil(topk * nk))
        keep_sorted = keep_sorted.expand_as(probs)
    else:
        sorted_p = probs.gather(-1, order)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more probable blocks
        keep_sorted = before < cdf_threshold
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    keep |= (q_sim < sim_threshold)[..., :, None]
    keep |= (k_sim < sim_threshold)[..., None, :]
    return keep


def tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """A permutation of ``frames * height * width`` row-major tokens that lists them tile by tile
    (each tile ``tile = (t, h, w)`` tokens, row-major inside; tiles row-major), so that consecutive
    blocks are compact 3D tiles. ``x[:, :, perm]`` reorders; ``inverse(perm)`` puts back."""
    f, hh, ww = grid
    tf, th, tw = tile
    idx = torch.arange(f * hh * ww, device=device).view(f, hh, ww)
    pf, ph, pw = (-f) % tf, (-hh) % th, (-ww) % tw
    if pf or ph or pw:  # ragged edges: the last tiles are smaller (padding removed below)
        idx = torch.nn.functional.pad(idx[None].float(), (0, pw, 0, ph, 0, pf), value=-1)[0].long()
    nf, nh, nw = idx.shape[0] // tf, idx.shape[1] // th, idx.shape[2] // tw
    tiles = idx.view(nf, tf, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(-1)
    return tiles[tiles >= 0]


def _expand(mask: torch.Tensor, block_q: int, block_k: int, n: int, m: int) -> torch.Tensor:
    return mask.repeat_interleave(block_q, dim=-2)[..., :n, :].repeat_interleave(block_k, dim=-1)[..., :m]


def _reference(q, k, v, keep, block_q, block_k, sm):
    b, h, n, _ = q.shape
    m = k.shape[2]
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32, device=q.device)
    chunk_blocks = max(1, (1 << 26) // max(1, b * h * m * block_q))
    for rows in query_chunks(keep.shape[2], chunk_blocks):
        t0, t1 = rows.start * block_q, min(n, rows.stop * block_q)
        allowed = _expand(keep[:, :, rows], block_q, block_k, t1 - t0, m)
        s = (q[:, :, t0:t1] @ k.transpose(-2, -1)) * sm
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, :, t0:t1] = s.softmax(dim=-1) @ v
    return out


def _gather(q, k, v, keep, block_q, block_k, sm):
    """Per group of query blocks: gather the key/value blocks any of them keeps, attend, mask the rest."""
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    kb = pad_tokens(k, block_k).view(b, h, -1, block_k, d)
    vb = pad_tokens(v, block_k).view(b, h, -1, block_k, dv)
    nk = kb.shape[2]
    key_valid = torch.arange(nk * block_k, device=q.device).view(nk, block_k) < m
    qp = pad_tokens(q, block_q)
    out = torch.empty(b, h, qp.shape[2], dv, dtype=torch.float32, device=q.device)
    for rows in query_chunks(keep.shape[2], GROUP_BLOCKS):
        group = keep[:, :, rows]  # (b, h, g, nk)
        used = group.any(dim=2)  # key blocks any query block of the group keeps: (b, h, nk)
        width = int(used.sum(dim=-1).max())
        # the used blocks first (stable), then pad with unused ones that are masked out below
        idx = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)[..., :width]  # (b, h, width)
        ks = kb.gather(2, idx[..., None, None].expand(b, h, width, block_k, d)).view(b, h, width * block_k, d)
        vs = vb.gather(2, idx[..., None, None].expand(b, h, width, block_k, dv)).view(b, h, width * block_k, dv)
        allowed = group.gather(-1, idx[:, :, None, :].expand(b, h, group.shape[2], width))  # (b, h, g, width)
        valid = key_valid[idx].view(b, h, width * block_k)  # padding tokens of the last key block
        allowed = allowed.repeat_interleave(block_q, dim=2).repeat_interleave(block_k, dim=3) & valid[:, :, None, :]
        t0, t1 = rows.start * block_q, rows.stop * block_q
        s = (qp[:, :, t0:t1] @ ks.transpose(-2, -1)) * sm
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, :, t0:t1] = s.softmax(dim=-1) @ vs
    return out[:, :, :n]


def _blocks(q, k, v, keep, block_q, block_k, sm):
    """One fused ``scaled_dot_product_attention`` per (batch, head, query block) over the key and
    value tokens of the key blocks it keeps, gathered: no mask, so the fused kernel runs, and the
    work is the kept share of the dense product."""
    b, h, n, d = q.shape
    m = k.shape[2]
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32, device=q.device)
    token_of_block = torch.arange(keep.shape[-1] * block_k, device=q.device).view(-1, block_k)
    keep_cpu = keep.cpu()  # one host copy of the (small) block mask, not one sync per block
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi], v[bi, hi]
            for i in range(keep.shape[2]):
                t0, t1 = i * block_q, min(n, (i + 1) * block_q)
                blocks = keep_cpu[bi, hi, i].nonzero().flatten()
                idx = token_of_block[blocks.to(q.device)].flatten()
                idx = idx[idx < m]
                out[bi, hi, t0:t1] = F.scaled_dot_product_attention(  # 4-D: the fused CPU kernel
                    q[bi:bi + 1, hi:hi + 1, t0:t1], kh[idx][None, None], vh[idx][None, None], scale=sm)[0, 0]
    return out


_flex_compiled = None


def _flex(q, k, v, keep, block_q, block_k, sm):
    global _flex_compiled
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if block_q != block_k:
        raise ValueError("impl='flex' needs block_q == block_k (a BlockMask has one block size per axis here)")
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    b, h, nq, nk = keep.shape
    counts = keep.sum(dim=-1).to(torch.int32)
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    n, m = q.shape[2], k.shape[2]

    def mask_mod(b_, h_, q_idx, kv_idx):
        return kv_idx < m

    mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(block_q, block_k), mask_mod=mask_mod,
                                    seq_lengths=(n, m))
    return _flex_compiled(q, k, v, block_mask=mask, scale=sm).float()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    block_q: int = 128,
    block_k: int = 64,
    cdf_threshold: float = 0.95,
    topk: float | None = None,
    sim_threshold: float = 0.5,
    order: str = "rows",
    grid: tuple[int, int, int] | None = None,
    tile: tuple[int, int, int] = (1, 8, 8),
    impl: str = "auto",
    return_keep: bool = False,
):
    """SpargeAttn-style block-sparse attention, SDPA's layout and arguments.

    Args:
        q, k, v: (batch, heads, tokens, head_dim), float32/bfloat16/float16, one dtype.
        attn_mask, dropout_p, is_causal: SDPA's; the kernel takes none of them and answers with
            exact attention instead (logged once per reason).
        scale: softmax scale (default 1/sqrt(head_dim)).
        block_q, block_k: tokens per query block (128) and key block (64), SpargeAttn's.
        cdf_threshold: tau, the probability mass of the pooled attention each query block keeps
            (0-1]; 1 keeps every block (computed as exact attention). Default 0.95.
        topk: keep this fraction of the key blocks per query block instead (0-1], or None.
        sim_threshold: theta, blocks whose mean pairwise token cosine is below it stay dense.
            Default 0.5.
        order: ``"rows"`` (blocks are runs of tokens as given) or ``"tiles"`` (blocks are 3D tiles
            of ``grid``; needs ``grid`` = (frames, height, width) with frames*height*width = tokens
            and query tokens = key tokens).
        tile: tile size (frames, height, width) in tokens for ``order="tiles"``. Default (1, 8, 8).
        impl: ``"auto"`` (``"blocks"``, or exact attention when the selection keeps >= 85% of the
            query-key pairs; the returned mask then keeps everything), ``"blocks"``, ``"reference"``, ``"gather"`` or ``"flex"``
            (compiled flex attention).
        return_keep: also return the kept-block mask (batch, heads, query blocks, key blocks).

    Returns:
        the output (batch, heads, tokens, head_dim of v) in the input dtype, and the mask if asked.
    """
    check_selection(cdf_threshold, topk, sim_threshold)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    sm, fallback = enter("sparse_attention", q, k, v, block_q, block_k, scale, attn_mask, dropout_p, is_causal)
    if fallback is not None:
        return (fallback, None) if return_keep else fallback
    if cdf_threshold >= 1 and topk is None:  # every block kept: exact attention
        out = exact(q, k, v, scale=scale)
        keep = torch.ones(q.shape[0], q.shape[1], math.ceil(q.shape[2] / block_q), math.ceil(k.shape[2] / block_k),
                          dtype=torch.bool, device=q.device)
        return (out, keep) if return_keep else out
    perm = None
    if order == "tiles":
        if grid is None or len(grid) != 3 or math.prod(grid) != q.shape[2] or q.shape[2] != k.shape[2]:
            raise ValueError(f"order='tiles' needs grid=(frames, height, width) with a product equal to the "
                             f"tokens ({q.shape[2]}) and as many key as query tokens; got grid={grid}")
        perm = tile_order(tuple(grid), tuple(tile), q.device)
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    keep = select_blocks(q, k, block_q=block_q, block_k=block_k, cdf_threshold=cdf_threshold, topk=topk,
                         sim_threshold=sim_threshold, scale=sm)
    qf, kf, vf = q.float(), k.float(), v.float()
    if impl == "auto" and float(kept_pairs(keep, q.shape[2], k.shape[2], block_q, block_k)) >= DENSE_SHARE * keep.shape[0] \
            * keep.shape[1] * q.shape[2] * k.shape[2]:
        # nearly everything kept: exact attention is faster than the block loop, and exact
        keep = torch.ones_like(keep)
        out = exact(qf, kf, vf, scale=sm)
    elif impl == "reference":
        out = _reference(qf, kf, vf, keep, block_q, block_k, sm)
    elif impl in ("auto", "blocks"):
        out = _blocks(qf, kf, vf, keep, block_q, block_k, sm)
    elif impl == "flex":
        out = _flex(qf, kf, vf, keep, block_q, block_k, sm)
    else:
        out = _gather(qf, kf, vf, keep, block_q, block_k, sm)
    if perm is not None:
        out = out[:, :, torch.argsort(perm)]
    out = out.to(q.dtype)
    return (out, keep) if return_keep else out


def kept_pairs(keep: torch.Tensor, n: int, m: int, block_q: int, block_k: int) -> torch.Tensor:
    """(query, key) token pairs a kept-block mask computes, summed over batch and heads (a 0-d
    tensor on the mask's device: no host sync)."""
    qc = block_counts(n, block_q, keep.device)
    kc = block_counts(m, block_k, keep.device)
    return (keep.float() * qc[:, None] * kc[None, :]).sum()


def sparsity(keep: torch.Tensor, n: int, m: int, block_q: int, block_k: int) -> float:
    """Share of the (query, key) token pairs skipped by a kept-block mask (0 = dense)."""
    return float(1 - kept_pairs(keep, n, m, block_q, block_k) / (keep.shape[0] * keep.shape[1] * n * m))
