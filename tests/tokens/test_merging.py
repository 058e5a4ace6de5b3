"""TokenMerging (ToMe for SD) and TokenDownsampling (ToDo) on the tiny UNet / PixArt pipelines.

The tiny UNets (tests/factories.py) have self-attention only at their second level (downsampled
2x: a 4 x 4 token grid at 64 px), so most tests use ``max_downsample=2``.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import diffboost
from diffboost import TaylorSeer, TokenDownsampling, TokenMerging, UnsupportedPipelineError
from diffboost.tokens.merging import _Grid, bipartite_merge
from factories import FAMILIES, run

UNETS = ["sd", "sdxl"]
EXACT = [TokenMerging(ratio=0.0, max_downsample=8), TokenDownsampling(factor=1, max_downsample=8)]
ACTIVE = [
    TokenMerging(ratio=0.5, max_downsample=2),
    TokenMerging(ratio=0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True, sx=1, sy=2),
    TokenMerging(ratio=0.25, max_downsample=2, merge_attn=False, merge_mlp=True, random_dst=False),
    TokenDownsampling(factor=2, max_downsample=2),
    TokenDownsampling(factor=2, max_downsample=2, mode="avg"),
]


class Recorder(AttnProcessor2_0):
    """The default SDPA processor, recording the sequence lengths it is called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        kv = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        self.seen.append((hidden_states.shape[1], kv.shape[1]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *a, **k)


def self_attentions(pipe):
    return [m.attn1 for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]


def reduced_calls(pipe):
    return sum(item.get("reduced_calls", 0) for item in diffboost.describe(pipe)["last_call"])


@pytest.fixture(scope="module", params=UNETS)
def unet_pipe(request):
    pipe = FAMILIES[request.param]()
    return request.param, pipe, run(pipe, request.param)


@pytest.mark.parametrize("plugin", EXACT, ids=repr)
def test_zero_reduction_is_bit_identical_and_remove_restores(unet_pipe, plugin):
    family, pipe, base = unet_pipe
    before = [a.processor for a in self_attentions(pipe)]
    diffboost.apply(pipe, plugin)
    assert all(a.processor is not p for a, p in zip(self_attentions(pipe), before))
    out = run(pipe, family)
    calls = reduced_calls(pipe)
    diffboost.remove(pipe)
    assert torch.equal(out, base)
    assert calls == 0
    assert [a.processor for a in self_attentions(pipe)] == before
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    assert "forward" not in vars(pipe.unet)
    assert torch.equal(run(pipe, family), base)


@pytest.mark.parametrize("plugin", ACTIVE, ids=repr)
def test_reduction_changes_output_stays_finite_and_remove_restores(unet_pipe, plugin):
    family, pipe, base = unet_pipe
    with diffboost.accelerated(pipe, plugin):
        out = run(pipe, family)
        again = run(pipe, family)
        calls = reduced_calls(pipe)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out).all()
    assert calls > 0
    assert not torch.equal(out, base)
    assert torch.equal(out, again), "a call is not deterministic (seeded destinations)"
    assert torch.equal(run(pipe, family), base)


def test_attention_sees_the_reduced_sequence():
    pipe = FAMILIES["sd"]()
    rec = Recorder()
    for attn in self_attentions(pipe):
        attn.set_processor(rec)
    with diffboost.accelerated(pipe, TokenMerging(ratio=0.5, max_downsample=2)):
        run(pipe, "sd")
    assert rec.seen and set(rec.seen) == {(8, 8)}, rec.seen  # 4 x 4 grid, r = 8 merged
    assert all(a.processor is rec for a in self_attentions(pipe))  # remove() put ours back

    rec.seen.clear()
    with diffboost.accelerated(pipe, TokenMerging(ratio=0.7, max_downsample=2)):
        run(pipe, "sd", height=128, width=128)  # 8 x 8 grid, r = int(0.7 * 64) = 44 (<= 48 sources)
    assert set(rec.seen) == {(64 - 44, 64 - 44)}

    rec.seen.clear()
    with diffboost.accelerated(pipe, TokenDownsampling(factor=2, max_downsample=2)):
        run(pipe, "sd", height=128, width=128)
    assert set(rec.seen) == {(64, 16)}  # all queries, keys/values of a 4 x 4 grid

    rec.seen.clear()
    with diffboost.accelerated(pipe, TokenDownsampling(factor=3, max_downsample=2)):
        run(pipe, "sd", height=80, width=80)  # 5 x 5 grid -> ceil(5 / 3) = 2 per axis
    assert set(rec.seen) == {(25, 4)}


@pytest.mark.parametrize("plugin", [TokenMerging(), TokenDownsampling()], ids=repr)
def test_max_downsample_1_leaves_lower_resolution_blocks_alone(unet_pipe, plugin):
    family, pipe, base = unet_pipe  # the tiny UNets have no attention at full resolution
    with diffboost.accelerated(pipe, plugin):
        out = run(pipe, family)
        calls = reduced_calls(pipe)
    assert calls == 0 and torch.equal(out, base)


def test_batch_cfg_and_resolution_changes_between_calls():
    pipe = FAMILIES["sd"]()
    with diffboost.accelerated(pipe, TokenMerging(ratio=0.5, max_downsample=2, merge_mlp=True)):
        first = run(pipe, "sd")
        batch = run(pipe, "sd", prompt=["a red circle", "a blue square"])  # UNet batch 4 with CFG
        no_cfg = run(pipe, "sd", guidance_scale=1.0)
        large = run(pipe, "sd", height=128, width=96)
        odd = run(pipe, "sd", height=72, width=56)  # 9 x 7 latent -> 5 x 4 tokens, partial windows
        again = run(pipe, "sd")
    assert batch.shape == (2, 4, 8, 8) and large.shape == (1, 4, 16, 12) and odd.shape == (1, 4, 9, 7)
    for out in (first, batch, no_cfg, large, odd):
        assert torch.isfinite(out).all()
    assert torch.equal(first, again), "state leaked from one call into the next"


def test_stacks_with_taylorseer():
    pipe = FAMILIES["sdxl"]()
    base = run(pipe, "sdxl", num_inference_steps=6)
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=1), TokenMerging(ratio=0.5, max_downsample=2)):
        out = run(pipe, "sdxl", num_inference_steps=6)
        stats = diffboost.describe(pipe)["last_call"]
    assert torch.isfinite(out).all() and out.shape == base.shape
    tokens = next(s for s in stats if "reduced_calls" in s)
    cache = next(s for s in stats if "branches" in s)
    assert tokens["reduced_calls"] > 0
    assert sum(b["forecast"] for b in cache["branches"].values()) > 0
    assert torch.equal(run(pipe, "sdxl", num_inference_steps=6), base)

    # a token plugin plus a cache that never skips = the token plugin alone
    with diffboost.accelerated(pipe, TokenDownsampling(factor=2, max_downsample=2)):
        alone = run(pipe, "sdxl")
    with diffboost.accelerated(pipe, TokenDownsampling(factor=2, max_downsample=2), TaylorSeer(interval=1)):
        stacked = run(pipe, "sdxl")
    assert torch.equal(alone, stacked)


def test_pixart_blocks():
    pipe = FAMILIES["pixart_sigma"]()
    base = run(pipe, "pixart_sigma")
    for plugin in EXACT:
        with diffboost.accelerated(pipe, plugin):
            assert torch.equal(run(pipe, "pixart_sigma"), base)
    for plugin in ACTIVE:
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "pixart_sigma")
            assert reduced_calls(pipe) > 0
        assert torch.isfinite(out).all() and out.shape == base.shape
    assert torch.equal(run(pipe, "pixart_sigma"), base)


def test_unsupported_family_names_the_supported_ones():
    pipe = FAMILIES["flux"]()
    for plugin in (TokenMerging(), TokenDownsampling()):
        with pytest.raises(UnsupportedPipelineError, match=r"sd, sdxl, pixart.*not flux"):
            diffboost.apply(pipe, plugin)
    assert not hasattr(pipe, "_diffboost_handle")
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.modules())


@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (TokenMerging, dict(ratio=-0.1), ValueError, r"TokenMerging\.ratio=-0\.1 .*>= 0.0 and <= 1.0"),
        (TokenMerging, dict(ratio=1.5), ValueError, r"TokenMerging\.ratio=1\.5 .*<= 1.0"),
        (TokenMerging, dict(ratio="half"), TypeError, r"TokenMerging\.ratio must be a number"),
        (TokenMerging, dict(sx=0), ValueError, r"TokenMerging\.sx=0 .*>= 1 and <= 64"),
        (TokenMerging, dict(sy=2.0), TypeError, r"TokenMerging\.sy must be an int"),
        (TokenMerging, dict(sx=1, sy=1), ValueError, r"TokenMerging\.sx \* TokenMerging\.sy = 1.*>= 2"),
        (TokenMerging, dict(max_downsample=3), ValueError, r"TokenMerging\.max_downsample=3 .*\(1, 2, 4, 8\)"),
        (TokenMerging, dict(seed=-1), ValueError, r"TokenMerging\.seed=-1"),
        (TokenMerging, dict(merge_mlp=1), TypeError, r"TokenMerging\.merge_mlp must be True or False"),
        (TokenMerging, dict(merge_attn=False), ValueError, r"merge_attn, merge_crossattn and merge_mlp"),
        (TokenDownsampling, dict(factor=0), ValueError, r"TokenDownsampling\.factor=0 .*>= 1 and <= 8"),
        (TokenDownsampling, dict(factor=1.5), TypeError, r"TokenDownsampling\.factor must be an int"),
        (TokenDownsampling, dict(max_downsample=16), ValueError, r"TokenDownsampling\.max_downsample=16"),
        (TokenDownsampling, dict(mode="bicubic"), ValueError, r"TokenDownsampling\.mode='bicubic'.*'nearest', 'avg'"),
    ],
)
def test_invalid_hyperparameters(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_grid_levels_follow_the_unet_downsampling():
    grid = _Grid()
    assert grid.level(16) is None  # no denoiser call seen yet
    grid.size = (9, 7)
    assert grid.level(63) == (1, 9, 7)
    assert grid.level(20) == (2, 5, 4)  # ceil(9 / 2) x ceil(7 / 2)
    assert grid.level(6) == (4, 3, 2)
    assert grid.level(77) is None  # not a level of this grid (e.g. text tokens)


def test_bipartite_merge_math():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6 * 5, 8, generator=gen)
    m = bipartite_merge(x, 6, 5, 2, 2, r=10, generator=torch.Generator().manual_seed(3))
    assert m.slots == 20 and m.slot.shape == (2, 30)
    merged = m.merge(x)
    assert merged.shape == (2, 20, 8)
    for b in range(2):
        for s in range(20):  # every slot holds the mean of its tokens
            members = (m.slot[b] == s).nonzero().squeeze(1)
            assert members.numel() >= 1
            torch.testing.assert_close(merged[b, s], x[b, members].mean(0))
    # unmerging copies a slot's value to every token in it
    assert torch.equal(m.unmerge(merged)[0, m.slot[0] == 0], merged[0, :1].expand((m.slot[0] == 0).sum(), -1))
    # 6 x 5 grid, 2 x 2 windows: 3 x 2 destinations; merging is capped at the 24 sources
    assert bipartite_merge(x, 6, 5, 2, 2, r=100).slots == 6
    assert bipartite_merge(x, 6, 5, 2, 2, r=0) is None
    # identical tokens survive merge + unmerge unchanged; the same seed gives the same matching
    same = torch.ones(1, 16, 4)
    s1 = bipartite_merge(same, 4, 4, 2, 2, 8, torch.Generator().manual_seed(1))
    s2 = bipartite_merge(same, 4, 4, 2, 2, 8, torch.Generator().manual_seed(1))
    assert torch.equal(s1.unmerge(s1.merge(same)), same) and torch.equal(s1.slot, s2.slot)


# ----------------------------------------------------------------------------------------------
# the decision rules and the math on constructed tokens (issue #19): hand-computed answers
# ----------------------------------------------------------------------------------------------

import inspect
import logging
import math
from types import SimpleNamespace

from diffboost.plugins.base import PluginKind
from diffboost.tokens.merging import (
    TokenInstall,
    _BlockSite,
    _destinations,
    _DownsampleKeysValues,
    _GridHook,
    _Merge,
    _MergeCrossAttention,
    _MergeSelfAttention,
    _plain_self_attention,
)


def _tokens(*pairs):
    """(1, N, 2) tokens in the plane, each given as (angle in degrees, norm)."""
    return torch.tensor([[[n * math.cos(math.radians(a)), n * math.sin(math.radians(a))] for a, n in pairs]])


# a 2 x 4 grid with 2 x 2 windows and top-left destinations: B = {0, 2}, A = {1, 3, 4, 5, 6, 7}.
# Cosine similarity is the cosine of the angle between two tokens, whatever their norms:
#   token  angle  nearest dst  best similarity
#     1      5°       0         cos  5° = 0.9962
#     3     70°       2         cos 20° = 0.9397
#     4     40°       0         cos 40° = 0.7660   (norm 10: the largest dot product of all)
#     5     88°       2         cos  2° = 0.9994   (norm 0.5)
#     6     30°       0         cos 30° = 0.8660
#     7     55°       2         cos 35° = 0.8192
# so with r = 3 the sources 5, 1, 3 (most similar first) merge; 6, 7, 4 keep their own slots, in
# that order (slots 2, 3, 4 after the destinations' 0, 1).
PLANE = _tokens((0, 1), (5, 1), (90, 1), (70, 1), (40, 10), (88, 0.5), (30, 1), (55, 1))
PLANE_SLOTS = [0, 0, 1, 1, 4, 1, 2, 3]


def test_bipartite_merge_merges_the_most_similar_pairs():
    m = bipartite_merge(PLANE, 2, 4, 2, 2, r=3)
    assert m.slots == 5 and m.shape == (1, 8)
    assert m.slot.tolist() == [PLANE_SLOTS]
    # fewer merges: the most similar first (5, then 1), never a less similar source before them
    assert bipartite_merge(PLANE, 2, 4, 2, 2, r=1).slot.tolist() == [[0, 2, 1, 3, 6, 1, 4, 5]]
    assert bipartite_merge(PLANE, 2, 4, 2, 2, r=2).slot.tolist() == [[0, 0, 1, 2, 5, 1, 3, 4]]
    # r above the number of sources merges every source into its nearest destination
    assert bipartite_merge(PLANE, 2, 4, 2, 2, r=100).slot.tolist() == [[0, 0, 1, 1, 0, 1, 0, 1]]


def test_bipartite_merge_batch_elements_are_matched_independently():
    # element 1: the destinations swapped directions, so every source goes to the other destination
    swapped = _tokens((90, 1), (5, 1), (0, 1), (70, 1), (40, 10), (88, 0.5), (30, 1), (55, 1))
    m = bipartite_merge(torch.cat([PLANE, swapped]), 2, 4, 2, 2, r=3)
    assert m.slot.tolist() == [PLANE_SLOTS, [0, 1, 1, 0, 4, 0, 2, 3]]


def test_bipartite_merge_compares_half_precision_tokens_in_float32():
    # sources 1 (3°, cos = 0.99863) and 5 (88°, cos = 0.99939): both round to 1.0 in bfloat16, where the
    # stable sort would merge source 1 first; in float32 source 5 is the more similar one
    x = _tokens((0, 1), (3, 1), (90, 1), (60, 1), (45.5, 1), (88, 1), (30, 1), (55, 1))
    expected = [[0, 2, 1, 3, 6, 1, 4, 5]]
    assert bipartite_merge(x, 2, 4, 2, 2, r=1).slot.tolist() == expected
    assert bipartite_merge(x.bfloat16(), 2, 4, 2, 2, r=1).slot.tolist() == expected
    assert bipartite_merge(x.half(), 2, 4, 2, 2, r=1).slot.tolist() == expected


def test_merge_is_the_mean_of_each_slot_and_unmerge_copies_it_back():
    x = PLANE * torch.tensor([1.0, 2.0])  # any values: merging averages the tokens, not their directions
    m = bipartite_merge(PLANE, 2, 4, 2, 2, r=3)
    merged = m.merge(x)
    expected = torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3] + x[0, 5]) / 3, x[0, 6], x[0, 7], x[0, 4]])
    torch.testing.assert_close(merged, expected.unsqueeze(0), rtol=0, atol=1e-6)
    y = torch.tensor([[[10.0], [11.0], [12.0], [13.0], [14.0]]])
    assert m.unmerge(y).flatten().tolist() == [10.0, 10.0, 11.0, 11.0, 14.0, 11.0, 12.0, 13.0]
    # fits: only (B, N, C) tensors of the matched batch and length
    assert m.fits(x) and m.fits(torch.zeros(1, 8, 3))
    assert not m.fits(torch.zeros(2, 8, 2)) and not m.fits(torch.zeros(1, 7, 2)) and not m.fits(torch.zeros(1, 8))
    # a _Merge built by hand: slot 1 holds tokens 0 and 2
    hand = _Merge(torch.tensor([[1, 0, 1]]), 2)
    assert hand.merge(torch.tensor([[[2.0], [5.0], [6.0]]])).flatten().tolist() == [5.0, 4.0]


def test_bipartite_merge_nothing_to_merge():
    x = torch.randn(1, 6, 4)
    assert bipartite_merge(x, 2, 3, 2, 2, r=0) is None
    assert bipartite_merge(x, 2, 3, 2, 2, r=-1) is None
    assert bipartite_merge(x, 1, 6, 2, 2, r=2) is None  # a 1-row grid has no full 2 x 2 window
    assert bipartite_merge(x[:, :2], 1, 2, 2, 1, r=1).slot.tolist() == [[0, 0]]  # one window, one source


def test_destinations_one_per_full_window():
    # top-left of every full window, row-major; partial windows (the last row and column) have none
    assert _destinations(5, 7, 3, 2, None).tolist() == [0, 3, 14, 17]
    assert _destinations(4, 4, 2, 2, None).tolist() == [0, 2, 8, 10]
    assert _destinations(1, 5, 2, 2, None).numel() == 0
    # random: offset o in [0, sx * sy) -> row o // sx, column o % sx inside the window
    seed = 4
    offsets = torch.randint(6, (2, 2), generator=torch.Generator().manual_seed(seed)).tolist()
    expected = [(wy * 2 + o // 3) * 7 + wx * 3 + o % 3 for wy, row in enumerate(offsets) for wx, o in enumerate(row)]
    got = _destinations(5, 7, 3, 2, torch.Generator().manual_seed(seed)).tolist()
    assert got == expected and got != [0, 3, 14, 17]
    for sx, sy in ((3, 2), (2, 3), (1, 4)):
        for seed in range(8):
            dst = _destinations(8, 9, sx, sy, torch.Generator().manual_seed(seed))
            windows = sorted(((int(i) // 9) // sy, (int(i) % 9) // sx) for i in dst)
            assert windows == [(a, b) for a in range(8 // sy) for b in range(9 // sx)], (sx, sy, seed)


def test_grid_levels_cache_per_size_and_stop_at_64():
    grid = _Grid()
    grid.size = (256, 256)
    assert grid.level(256 * 256) == (1, 256, 256)
    assert grid.level(16) == (64, 4, 4)
    assert grid.level(4) is None  # would be downsample 128: past the deepest level looked at
    grid.size = (8, 6)
    assert grid.level(12) == (2, 4, 3) and grid.level(16) is None
    grid.size = (8, 8)
    assert grid.level(16) == (2, 4, 4) and grid.level(12) is None


def test_grid_hook_reads_the_latent_grid():
    grid = _Grid()
    unet = _GridHook(grid, "sample", 1)
    unet.pre_forward(None, sample=torch.zeros(2, 4, 9, 7))
    assert grid.size == (9, 7)
    unet.pre_forward(None, torch.zeros(1, 4, 6, 5))
    assert grid.size == (6, 5)
    unet.pre_forward(None, sample=torch.zeros(1, 4, 9))
    assert grid.size is None
    pixart = _GridHook(grid, "hidden_states", 2)
    pixart.pre_forward(None, hidden_states=torch.zeros(1, 4, 8, 6))
    assert grid.size == (4, 3)


def test_plain_self_attention_rule():
    x = torch.zeros(1, 4, 8)
    assert _plain_self_attention(x, (), {})
    assert _plain_self_attention(x, (), {"encoder_hidden_states": None, "attention_mask": None, "temb": 1})
    assert not _plain_self_attention(x, (x,), {})
    assert not _plain_self_attention(torch.zeros(1, 8, 2, 2), (), {})
    assert not _plain_self_attention(x, (), {"encoder_hidden_states": x})
    assert not _plain_self_attention(x, (), {"attention_mask": torch.ones(1, 4)})


class _Inner:
    """A stand-in attention processor: records what it gets, returns 2 * hidden_states."""

    def __init__(self):
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        self.seen.append((hidden_states.clone(), encoder_hidden_states))
        return 2 * hidden_states

    def __repr__(self):
        return "Inner()"


def _owner(cfg, size):
    grid = _Grid()
    grid.size = size
    return TokenInstall(cfg, SimpleNamespace(attr="unet"), grid, hooks=None)


def test_tome_wrapper_merges_by_ratio_at_allowed_levels():
    x = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0))
    cfg = TokenMerging(ratio=0.3, max_downsample=2, random_dst=False)
    owner, inner = _owner(cfg, (8, 8)), _Inner()
    wrapper = _MergeSelfAttention(inner, _BlockSite(owner), consumers=False)
    out = wrapper(None, x)  # a 4 x 4 block: downsample 2 = max_downsample, acts
    m = bipartite_merge(x, 4, 4, 2, 2, r=4)  # r = int(16 * 0.3) = 4
    assert inner.seen[-1][0].shape == (1, 12, 3)
    assert torch.equal(out, m.unmerge(2 * m.merge(x)))
    assert owner.stats() == {"denoiser": "unet", "plugin": repr(cfg), "blocks": 0, "reduced_calls": 1, "kept_share": 0.75}
    # an 8 x 8 block (downsample 1) acts too; a 2 x 2 block (downsample 4 > 2) is left alone
    wrapper(None, torch.randn(1, 64, 3))
    assert inner.seen[-1][0].shape[1] == 64 - int(64 * 0.3)
    small = torch.randn(1, 4, 3)
    assert torch.equal(wrapper(None, small), 2 * small) and torch.equal(inner.seen[-1][0], small)
    # not plain self-attention: unchanged arguments, not counted
    context = torch.randn(1, 5, 3)
    wrapper(None, x, encoder_hidden_states=context)
    assert inner.seen[-1][0].shape == (1, 16, 3) and inner.seen[-1][1] is context
    assert owner.calls == 2 and owner.tokens_in == 16 + 64 and owner.tokens_out == 12 + 64 - 19
    assert owner.stats()["kept_share"] == round(57 / 80, 4)
    owner.reset()
    assert (owner.calls, owner.tokens_in, owner.tokens_out) == (0, 0, 0) and owner.stats()["kept_share"] == 1.0
    owner.count(48, 16)
    assert owner.stats()["kept_share"] == 0.3333 and owner.stats()["reduced_calls"] == 1


def test_tome_destinations_random_per_call_and_reseeded_by_reset():
    x = torch.randn(1, 64, 3, generator=torch.Generator().manual_seed(1))
    owner = _owner(TokenMerging(ratio=0.5, seed=7), (8, 8))
    first, second = owner.match(x).slot, owner.match(x).slot
    assert not torch.equal(first, second), "the generator must advance from one block call to the next"
    expected = bipartite_merge(x, 8, 8, 2, 2, 32, torch.Generator().manual_seed(7)).slot
    owner.reset()
    assert torch.equal(owner.match(x).slot, expected) and torch.equal(first, expected)
    fixed = _owner(TokenMerging(ratio=0.5, random_dst=False), (8, 8))
    assert torch.equal(fixed.match(x).slot, bipartite_merge(x, 8, 8, 2, 2, 32).slot)
    assert _owner(TokenMerging(ratio=0.0), (8, 8)).match(x) is None
    assert _owner(TokenMerging(ratio=0.5), (8, 8)).match(torch.randn(1, 16, 3)) is None  # downsample 2 > 1
    assert _owner(TokenMerging(ratio=0.5), None).match(x) is None  # no grid recorded


def test_tome_consumers_share_the_matching():
    x = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(2))
    cfg = TokenMerging(ratio=0.5, max_downsample=2, merge_attn=False, merge_crossattn=True, random_dst=False)
    owner = _owner(cfg, (4, 4))
    site, inner = _BlockSite(owner), _Inner()
    attn1 = _MergeSelfAttention(inner, site, consumers=True)
    assert torch.equal(attn1(None, x), 2 * x)  # merge_attn=False: self-attention on all tokens
    m = site.current
    assert m is not None and m.slots == 8 and owner.calls == 1
    cross_inner = _Inner()
    context = torch.randn(1, 5, 3)
    attn2 = _MergeCrossAttention(cross_inner, site, last=True)
    out = attn2(None, x, encoder_hidden_states=context)
    assert cross_inner.seen[-1][0].shape == (1, 8, 3) and cross_inner.seen[-1][1] is context
    assert torch.equal(out, m.unmerge(2 * m.merge(x)))
    assert site.current is None  # the last consumer clears the matching
    assert torch.equal(attn2(None, x), 2 * x)  # no matching left: unchanged
    # a consumer that is not the last keeps it; a tensor that does not fit is left alone
    site.current = m
    assert _BlockSite.take(site, last=False) is m and site.current is m
    assert torch.equal(_MergeCrossAttention(_Inner(), site, last=False)(None, x[:, :8]), 2 * x[:, :8])
    assert site.current is m
    # without consumers attn1 keeps nothing on the site
    _MergeSelfAttention(_Inner(), site, consumers=False)(None, x)
    assert site.current is None


def test_todo_keys_values_from_the_downsampled_grid():
    x = torch.arange(25.0).reshape(1, 25, 1)  # a 5 x 5 grid holding its flat index
    expect = {
        ("nearest", 2): [0, 2, 4, 10, 12, 14, 20, 22, 24],
        ("nearest", 3): [0, 3, 15, 18],
        # avg: each 2 x 2 cell's mean; the partial cells at the edge average the tokens they have
        ("avg", 2): [3, 5, 6.5, 13, 15, 16.5, 20.5, 22.5, 24],
    }
    for (mode, f), kv in expect.items():
        owner, inner = _owner(TokenDownsampling(factor=f, mode=mode), (5, 5)), _Inner()
        out = _DownsampleKeysValues(inner, owner)(None, x)
        assert torch.equal(out, 2 * x)  # every query is kept
        assert torch.equal(inner.seen[-1][0], x)
        assert inner.seen[-1][1].flatten().tolist() == kv, (mode, f)
        assert owner.stats()["reduced_calls"] == 1 and owner.stats()["kept_share"] == round(len(kv) / 25, 4)
    # a 2 x 3 grid is unflattened row-major: (h, w), not (w, h)
    owner, inner = _owner(TokenDownsampling(factor=2), (2, 3)), _Inner()
    _DownsampleKeysValues(inner, owner)(None, torch.arange(6.0).reshape(1, 6, 1))
    assert inner.seen[-1][1].flatten().tolist() == [0, 2]


def test_todo_leaves_alone_what_it_must():
    x = torch.arange(16.0).reshape(1, 16, 1)
    cases = [
        (TokenDownsampling(factor=1, max_downsample=8), (4, 4), x, {}),  # factor 1: exact
        (TokenDownsampling(factor=2, max_downsample=1), (8, 8), x, {}),  # downsample 2 > 1
        (TokenDownsampling(factor=2, max_downsample=2), (4, 4), x, {"attention_mask": torch.ones(1, 16)}),
        (TokenDownsampling(factor=2, max_downsample=2), (4, 4), x, {"encoder_hidden_states": x}),
        (TokenDownsampling(factor=2, max_downsample=2), (5, 5), x, {}),  # not a level of the grid
    ]
    for cfg, size, hidden, kwargs in cases:
        owner, inner = _owner(cfg, size), _Inner()
        _DownsampleKeysValues(inner, owner)(None, hidden, **kwargs)
        assert inner.seen[-1][1] is kwargs.get("encoder_hidden_states"), cfg
        assert owner.calls == 0
    # downsample 2 = max_downsample 2 acts
    owner, inner = _owner(TokenDownsampling(factor=2, max_downsample=2), (8, 8)), _Inner()
    _DownsampleKeysValues(inner, owner)(None, x)
    assert inner.seen[-1][1].flatten().tolist() == [0, 2, 8, 10] and owner.calls == 1


def test_processor_wrapper_looks_like_the_wrapped_processor():
    inner = AttnProcessor2_0()
    wrapper = _DownsampleKeysValues(inner, _owner(TokenDownsampling(), (4, 4)))
    # Attention.forward filters keyword arguments by this signature
    assert inspect.signature(wrapper.__call__).parameters.keys() == inspect.signature(inner.__call__).parameters.keys()
    inner.marker = "from inner"
    assert wrapper.marker == "from inner"
    with pytest.raises(AttributeError):
        _ProcessorWrapperProbe.__getattr__(wrapper, "inner")
    assert repr(wrapper) == f"_DownsampleKeysValues({inner!r})"


from diffboost.tokens.merging import _ProcessorWrapper as _ProcessorWrapperProbe  # noqa: E402


def test_config_defaults_bounds_and_never_skips():
    assert dataclasses_fields(TokenMerging()) == dict(
        ratio=0.5, sx=2, sy=2, max_downsample=1, seed=0, random_dst=True,
        merge_attn=True, merge_crossattn=False, merge_mlp=False,
    )
    assert dataclasses_fields(TokenDownsampling()) == dict(factor=2, max_downsample=1, mode="nearest")
    # bounds are inclusive where documented
    TokenMerging(ratio=1.0, sx=64, sy=64, seed=2**63 - 1)
    TokenMerging(ratio=0.0, sx=1, sy=2)
    TokenMerging(sx=2, sy=1, merge_attn=False, merge_crossattn=True)
    TokenMerging(merge_attn=False, merge_mlp=True)
    TokenDownsampling(factor=8, max_downsample=8, mode="avg")
    for kwargs in (dict(sx=65), dict(sy=65), dict(seed=2**63)):
        with pytest.raises(ValueError):
            TokenMerging(**kwargs)
    with pytest.raises(ValueError):
        TokenDownsampling(factor=9)
    with pytest.raises(TypeError, match=r"^TokenMerging\.random_dst must be True or False, got int \(1\)$"):
        TokenMerging(random_dst=1)
    with pytest.raises(ValueError, match=r"^TokenMerging: merge_attn, merge_crossattn and merge_mlp are all False; set one$"):
        TokenMerging(merge_attn=False)
    assert TokenMerging(ratio=0.0).never_skips() and not TokenMerging(ratio=0.01).never_skips()
    assert TokenMerging().kind is PluginKind.TOKENS and TokenDownsampling().kind is PluginKind.TOKENS
    assert TokenDownsampling(factor=1).never_skips() and not TokenDownsampling(factor=2).never_skips()


def dataclasses_fields(plugin):
    import dataclasses

    return {f.name: getattr(plugin, f.name) for f in dataclasses.fields(plugin) if f.name != "kind"}


def test_each_wrapper_sees_the_merged_sequence_in_the_pipeline():
    """attn1 / attn2 / ff get the merged tokens exactly where the flags ask (tiny SD, 4 x 4 grid, r = 8)."""
    pipe = FAMILIES["sd"]()
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    seen = []
    recorders = {"attn1": Recorder(), "attn2": Recorder()}
    for b in blocks:  # processors that record what they get, under the plugin's wrappers
        for name, rec in recorders.items():
            getattr(b, name).set_processor(rec)
    # the feed-forward's first layer: after the plugin's hook on ``ff`` merged the tokens
    handles = [b.ff.net[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1])) for b in blocks]
    cases = [
        (TokenMerging(ratio=0.5, max_downsample=2), {"attn1": 8, "attn2": 16, "ff": 16}),
        (TokenMerging(ratio=0.5, max_downsample=2, merge_crossattn=True), {"attn1": 8, "attn2": 8, "ff": 16}),
        (TokenMerging(ratio=0.5, max_downsample=2, merge_attn=False, merge_mlp=True), {"attn1": 16, "attn2": 16, "ff": 8}),
        (TokenMerging(ratio=0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True), {"attn1": 8, "attn2": 8, "ff": 8}),
    ]
    try:
        for plugin, want in cases:
            seen.clear()
            for rec in recorders.values():
                rec.seen.clear()
            with diffboost.accelerated(pipe, plugin):
                run(pipe, "sd", num_inference_steps=1)
                stats = diffboost.describe(pipe)["last_call"][0]
            got = {name: sorted({q for q, _ in rec.seen}) for name, rec in recorders.items()}
            got["ff"] = sorted(set(seen))
            assert got == {name: [n] for name, n in want.items()}, (plugin, got)
            # CFG batch: one UNet call per step; every block makes one matching per call
            assert stats["blocks"] == len(blocks) and stats["reduced_calls"] == len(blocks), stats
            assert stats["kept_share"] == 0.5
        # the grid is read from the keyword argument too (sample= for UNets)
        with diffboost.accelerated(pipe, TokenDownsampling(factor=2, max_downsample=2)):
            recorders["attn1"].seen.clear()
            context = torch.zeros(2, 8, pipe.unet.config.cross_attention_dim)
            pipe.unet(sample=torch.zeros(2, 4, 8, 8), timestep=torch.tensor(1), encoder_hidden_states=context)
            assert set(recorders["attn1"].seen) == {(16, 4)}
    finally:
        for h in handles:
            h.remove()


def test_remove_keeps_a_processor_replaced_after_apply(caplog):
    pipe = FAMILIES["sd"]()
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    before = [b.attn1.processor for b in blocks]
    diffboost.apply(pipe, TokenMerging(max_downsample=2))
    mine = AttnProcessor2_0()
    blocks[0].attn1.set_processor(mine)
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        diffboost.remove(pipe)
    assert blocks[0].attn1.processor is mine
    assert [b.attn1.processor for b in blocks[1:]] == before[1:]
    assert sum("was replaced after apply()" in r.getMessage() for r in caplog.records) == 1
