"""sparse_attention: the block selection on constructed inputs (the cumulative rule, top-k, the
self-similarity guard), the implementations against each other and against exact attention over the
kept blocks, tile ordering, the sparsity count, fallbacks and refusals."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from diffboost.kernels import select_blocks, sparse_attention, sparsity, tile_order
from diffboost.kernels import common


def qkv(n=200, m=None, d=16, heads=2, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (torch.randn(batch, heads, n, d, generator=g), torch.randn(batch, heads, m, d, generator=g),
            torch.randn(batch, heads, m, d, generator=g))


def clustered(blocks=4, size=8, d=8, strength=6.0):
    """Query block i and key block i share a direction; tokens in a block agree (self-similar)."""
    g = torch.Generator().manual_seed(1)
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:blocks]  # orthonormal directions
    x = dirs.repeat_interleave(size, 0) * strength + 0.05 * torch.randn(blocks * size, d, generator=g)
    return x[None, None].clone(), x[None, None].clone()


def test_matching_blocks_are_kept_and_the_rest_dropped():
    q, k = clustered()
    keep = select_blocks(q, k, block_q=8, block_k=8, cdf_threshold=0.9, sim_threshold=0.5, scale=1.0)
    assert torch.equal(keep[0, 0], torch.eye(4, dtype=torch.bool))


def test_the_cumulative_rule_keeps_the_fewest_blocks_reaching_tau():
    q, k, _ = qkv(n=64, m=96, d=8, heads=3, seed=4)
    q, k = 3 * q, 3 * k
    for tau in (0.3, 0.6, 0.9):
        keep = select_blocks(q, k, block_q=16, block_k=16, cdf_threshold=tau, sim_threshold=-1.0)
        qm = q.view(1, 3, 4, 16, 8).mean(3)
        km = k.view(1, 3, 6, 16, 8).mean(3)
        probs = ((qm @ km.transpose(-1, -2)) / math.sqrt(8)).softmax(-1)  # equal block sizes: log n_j cancels
        for h in range(3):
            for i in range(4):
                p = probs[0, h, i]
                top = p.sort(descending=True).values.cumsum(0)
                need = int((top < tau).sum()) + 1  # the fewest reaching tau
                assert int(keep[0, h, i].sum()) == need
                kept_mass = float(p[keep[0, h, i]].sum())
                assert kept_mass >= tau - 1e-6
                dropped = p[~keep[0, h, i]]
                assert float(p[keep[0, h, i]].min()) >= (float(dropped.max()) if len(dropped) else 0.0)


def test_topk_keeps_that_fraction_per_row():
    q, k, _ = qkv(n=64, m=160, d=8)
    keep = select_blocks(q, k, block_q=16, block_k=16, topk=0.25, sim_threshold=-1.0)
    assert (keep.sum(-1) == math.ceil(0.25 * 10)).all()


def test_dissimilar_blocks_stay_dense():
    q, k = clustered()
    g = torch.Generator().manual_seed(2)
    q[0, 0, 8:16] = torch.randn(8, 8, generator=g) * torch.tensor([1.0, -1.0]).repeat(4)[:, None]  # query block 1
    k[0, 0, 24:32] = torch.randn(8, 8, generator=g)  # key block 3
    keep = select_blocks(q, k, block_q=8, block_k=8, cdf_threshold=0.9, sim_threshold=0.5, scale=1.0)[0, 0]
    assert keep[1].all()  # a dense row
    assert keep[:, 3].all()  # a dense column
    assert keep[0].tolist() == [True, False, False, True] and keep[2].tolist() == [False, False, True, True]
    off = select_blocks(q, k, block_q=8, block_k=8, cdf_threshold=0.9, sim_threshold=-1.0, scale=1.0)[0, 0]
    assert not off[1].all()


def masked_exact(q, k, v, keep, bq, bk, scale=None):
    n, m = q.shape[2], k.shape[2]
    allowed = keep.repeat_interleave(bq, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :m]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


@pytest.mark.parametrize("n, m, bq, bk", [(200, 200, 32, 16), (100, 77, 16, 32), (128, 128, 64, 64), (33, 130, 8, 8)])
def test_implementations_agree_and_compute_exact_attention_over_the_kept_blocks(n, m, bq, bk):
    q, k, v = qkv(n=n, m=m, heads=3, batch=2)
    outs = {}
    for impl in ("reference", "gather", "blocks"):
        outs[impl], keep = sparse_attention(q, k, v, block_q=bq, block_k=bk, cdf_threshold=0.45, sim_threshold=-1,
                                            impl=impl, return_keep=True)
    assert 0 < sparsity(keep, n, m, bq, bk) < 1
    assert torch.allclose(outs["reference"], outs["gather"], atol=1e-5)
    assert torch.allclose(outs["reference"], outs["blocks"], atol=1e-5)
    assert torch.allclose(outs["gather"], masked_exact(q, k, v, keep, bq, bk), atol=1e-5)


def test_tau_one_is_exact_attention():
    q, k, v = qkv(n=100)
    out, keep = sparse_attention(q, k, v, cdf_threshold=1.0, return_keep=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)) and keep.all()


def test_sparsity_counts_token_pairs_with_partial_blocks():
    keep = torch.tensor([[True, False], [False, False]])[None, None]  # 2 x 2 blocks of 4 tokens; n=6, m=5
    assert sparsity(keep, 6, 5, 4, 4) == pytest.approx(1 - 16 / 30)


def test_tile_order_lists_tiles():
    perm = tile_order((1, 4, 6), (1, 2, 3))
    assert perm.tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20, 15, 16, 17, 21, 22, 23]
    ragged = tile_order((2, 3, 3), (1, 2, 2))
    assert sorted(ragged.tolist()) == list(range(18)) and ragged[:4].tolist() == [0, 1, 3, 4]


def test_tiles_order_is_undone_in_the_output():
    q, k, v = qkv(n=96, d=8)
    grid = (2, 6, 8)
    dense = sparse_attention(q, k, v, order="tiles", grid=grid, tile=(1, 2, 4), cdf_threshold=0.999999,
                             sim_threshold=-1, topk=1.0, block_q=8, block_k=8)
    assert torch.allclose(dense, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    out, keep = sparse_attention(q, k, v, order="tiles", grid=grid, tile=(1, 2, 4), cdf_threshold=0.5,
                                 sim_threshold=-1, block_q=8, block_k=8, return_keep=True)
    perm = tile_order(grid, (1, 2, 4))
    expect = masked_exact(q[:, :, perm], k[:, :, perm], v[:, :, perm], keep, 8, 8)[:, :, torch.argsort(perm)]
    assert torch.allclose(out, expect, atol=1e-5)


def test_fallbacks_are_exact_and_logged_once(caplog):
    common._warned.clear()
    q, k, v = qkv(n=40)
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        a = sparse_attention(q, k, v, is_causal=True)
        sparse_attention(q, k, v, is_causal=True)
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert caplog.text.count("sparse_attention does not take causal attention") == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"cdf_threshold": 0.0}, "cdf_threshold must be in (0, 1]"),
    ({"topk": 1.5}, "topk must be a fraction in (0, 1]"),
    ({"sim_threshold": 2.0}, "sim_threshold must be in [-1, 1]"),
    ({"impl": "cuda"}, "impl must be one of"),
    ({"order": "zigzag"}, "order must be one of"),
    ({"order": "tiles"}, "order='tiles' needs grid"),
    ({"order": "tiles", "grid": (1, 5, 5)}, "a product equal to the tokens (40)"),
    ({"block_k": 5000}, "block_k must be an integer in [1, 4096]"),
])
def test_refusals(kwargs, message):
    q, k, v = qkv(n=40)
    with pytest.raises(ValueError) as err:
        sparse_attention(q, k, v, **kwargs)
    assert message in str(err.value)


@pytest.mark.slow
def test_flex_attention_path_matches_the_reference():
    """Compiled flex attention with a BlockMask from our selection (compiles for about 20 s on CPU)."""
    q, k, v = qkv(n=256, m=192, d=16)
    out, keep = sparse_attention(q, k, v, block_q=64, block_k=64, cdf_threshold=0.5, sim_threshold=-1, impl="flex",
                                 return_keep=True)
    ref = sparse_attention(q, k, v, block_q=64, block_k=64, cdf_threshold=0.5, sim_threshold=-1, impl="reference")
    assert 0 < sparsity(keep, 256, 192, 64, 64) < 1
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="needs block_q == block_k"):
        sparse_attention(q, k, v, block_q=64, block_k=32, cdf_threshold=0.5, impl="flex")


def test_auto_computes_exact_attention_when_nearly_everything_is_kept():
    q, k, v = qkv(n=256, d=16)
    # top-k 7/8 of 8 key blocks: 87.5% of the pairs kept
    _, selected = sparse_attention(q, k, v, topk=7 / 8, sim_threshold=-1, block_q=64, block_k=32, impl="blocks",
                                   return_keep=True)
    assert sparsity(selected, 256, 256, 64, 32) == pytest.approx(1 / 8)
    out, keep = sparse_attention(q, k, v, topk=7 / 8, sim_threshold=-1, block_q=64, block_k=32, return_keep=True)
    assert keep.all() and torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    _, keep = sparse_attention(q, k, v, topk=6 / 8, sim_threshold=-1, block_q=64, block_k=32, return_keep=True)
    assert sparsity(keep, 256, 256, 64, 32) == pytest.approx(2 / 8)  # 75% kept: the block loop
    sparse, keep = sparse_attention(q, k, v, cdf_threshold=0.3, sim_threshold=-1, block_q=64, block_k=64,
                                    return_keep=True)
    blocks = sparse_attention(q, k, v, cdf_threshold=0.3, sim_threshold=-1, block_q=64, block_k=64, impl="blocks")
    assert sparsity(keep, 256, 256, 64, 64) > 0.15 and torch.equal(sparse, blocks)


def test_block_self_similarity_values():
    from diffboost.kernels.sparse import _pool

    e1, e2 = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.5])  # norm 0.5: the normalisation matters
    x = torch.stack([e1, e1, e1, -e1, e1, e2, 3 * e1, 3 * e1])[None, None]  # blocks of 2
    mean, sim, counts = _pool(x, 2)
    assert sim[0, 0].tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0])
    assert mean[0, 0, 2].tolist() == pytest.approx([0.25, 0.25]) and counts.tolist() == [2, 2, 2, 2]


def test_partial_key_blocks_weigh_by_their_token_count():
    q = torch.zeros(1, 1, 8, 4)  # pooled scores all 0: the probabilities are the blocks' token shares
    k = torch.randn(1, 1, 96, 4)
    keep = select_blocks(q, k, block_q=8, block_k=64, cdf_threshold=0.6, sim_threshold=-1.0)
    assert keep[0, 0, 0].tolist() == [True, False]  # 64 of 96 tokens: 2/3 >= 0.6


def test_the_cumulative_rule_is_strict_at_tau():
    q = torch.zeros(1, 1, 8, 4)
    k = torch.randn(1, 1, 128, 4)  # two equal blocks: 0.5 each
    keep = select_blocks(q, k, block_q=8, block_k=64, cdf_threshold=0.5, sim_threshold=-1.0)
    assert keep[0, 0, 0].tolist() == [True, False]  # the mass before the second block is 0.5, not < 0.5


def test_topk_keeps_at_least_one_block():
    q, k, _ = qkv(n=16, m=160, d=8)
    keep = select_blocks(q, k, block_q=16, block_k=16, topk=0.01, sim_threshold=-1.0)
    assert (keep.sum(-1) == 1).all()


def test_defaults_are_spargeattns_blocks_and_theta():
    q, k = clustered(blocks=4, size=128, d=8)
    keep = select_blocks(q, k, cdf_threshold=0.9)
    assert keep.shape == (1, 1, 4, 8)  # 128-token query blocks, 64-token key blocks
    g = torch.Generator().manual_seed(3)
    q[0, 0, :128] = torch.randn(128, 8, generator=g)  # query block 0 dissimilar: dense under theta = 0.5
    assert select_blocks(q, k, cdf_threshold=0.9)[0, 0, 0].all()


@pytest.mark.parametrize("impl", ["reference", "gather", "blocks", "auto"])
def test_a_custom_scale_reaches_every_path(impl):
    q, k, v = qkv(n=96, m=80, heads=2, batch=2)
    out, keep = sparse_attention(q, k, v, scale=0.7, block_q=16, block_k=16, cdf_threshold=0.5, sim_threshold=-1,
                                 impl=impl, return_keep=True)
    assert torch.allclose(out, masked_exact(q, k, v, keep, 16, 16, scale=0.7), atol=1e-5)
    expect = select_blocks(q, k, scale=0.7, block_q=16, block_k=16, cdf_threshold=0.5, sim_threshold=-1)
    if impl != "auto" or not keep.all():
        assert torch.equal(keep, expect)


def test_tau_one_and_the_dense_shortcut_keep_the_scale_and_shapes():
    q, k, v = qkv(n=100, m=70, heads=3, batch=2)
    out, keep = sparse_attention(q, k, v, cdf_threshold=1.0, scale=0.4, return_keep=True, block_q=32, block_k=16)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=0.4))
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 4, 5) and keep.all()
    out, keep = sparse_attention(q, k, v, topk=1.0, scale=0.4, return_keep=True, block_q=32, block_k=16)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.4), atol=1e-6) and keep.all()
    assert out.dtype == q.dtype
    half = sparse_attention(*(t.half() for t in (q, k, v)), topk=0.5, block_q=32, block_k=16)
    assert half.dtype == torch.float16


def test_a_fallback_with_return_keep_gives_no_mask():
    q, k, v = qkv(n=40)
    out, keep = sparse_attention(q, k, v, is_causal=True, return_keep=True)
    assert keep is None and torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_tile_order_matches_a_loop_over_tiles_on_ragged_grids():
    def by_loops(grid, tile):
        f, h, w = grid
        tf, th, tw = tile
        out = []
        for f0 in range(0, f, tf):
            for h0 in range(0, h, th):
                for w0 in range(0, w, tw):
                    for a in range(f0, min(f, f0 + tf)):
                        for b in range(h0, min(h, h0 + th)):
                            for c in range(w0, min(w, w0 + tw)):
                                out.append((a * h + b) * w + c)
        return out

    for grid, tile in [((4, 5, 7), (3, 2, 3)), ((5, 4, 4), (3, 4, 4)), ((1, 6, 9), (1, 4, 4)), ((2, 3, 3), (1, 3, 3))]:
        assert tile_order(grid, tile).tolist() == by_loops(grid, tile), (grid, tile)
