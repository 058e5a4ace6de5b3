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
        (TokenMerging, dict(merge_mlp=1), TypeError, r"TokenMerging\.merge_mlp must be a bool"),
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
