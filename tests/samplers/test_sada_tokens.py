"""SADA token-wise sparsity (``SADA(token_sparsity=True)``) on the tiny SD UNet: exactness when off or
when every token is unstable, real pruning inside the blocks, batch 2 + CFG, remove(), validation."""

import pytest
import torch

import diffboost
from diffboost import SADA, UnsupportedPipelineError
from diffboost.samplers.sada import SADARuntime
from diffboost.samplers.sada_tokens import kept_tokens
from factories import make_flux, make_sd, run

STEPS = 8
# schedule=() switches step skipping off, so only the token-wise part acts; the tiny UNet has its
# transformer blocks one level down (downsample 2: a 4 x 4 grid at 64 px)
TOKENS = SADA(schedule=(), acc_range=(3, STEPS), max_consecutive_skips=4, token_sparsity=True, token_max_downsample=2)


@pytest.fixture(scope="module")
def sd():
    pipe = make_sd()
    return pipe, run(pipe, "sd", num_inference_steps=STEPS)


def _stats(pipe):
    return [s for s in diffboost.describe(pipe)["last_call"] if "skipped" in s][0]


def _blocks(pipe):
    return [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]


def test_disabled_or_empty_range_is_bit_identical(sd):
    pipe, base = sd
    for plugin in (
        SADA(schedule=()),
        SADA(schedule=(), token_sparsity=False, token_max_downsample=2),
        SADA(acc_range=(0, 0), token_sparsity=True, token_max_downsample=2),
        SADA(schedule=(), acc_range=(3, STEPS), max_consecutive_skips=1, token_sparsity=True, token_max_downsample=2),
    ):
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "sd", num_inference_steps=STEPS)
        assert torch.equal(out, base), plugin


def test_all_tokens_unstable_is_bit_identical(sd, monkeypatch):
    pipe, base = sd
    original = SADARuntime._m
    monkeypatch.setattr(SADARuntime, "_m", lambda self, st: original(self, st).abs() + 1.0)
    with diffboost.accelerated(pipe, TOKENS):
        out = run(pipe, "sd", num_inference_steps=STEPS)
        stats = _stats(pipe)
    assert stats["token_pruned_steps"], stats  # pruned steps were planned, but every token was kept
    assert stats["token_pruned_calls"] == 0
    assert torch.equal(out, base)


def test_blocks_see_fewer_tokens_and_remove_restores(sd):
    pipe, base = sd
    seen = []
    handles = [b.attn1.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1]), with_kwargs=True)
               for b in _blocks(pipe)]
    try:
        handle = diffboost.apply(pipe, TOKENS)
        out = run(pipe, "sd", num_inference_steps=STEPS)
        stats = _stats(pipe)
        handle.remove()
    finally:
        for h in handles:
            h.remove()
    assert stats["token_blocks"] == len(_blocks(pipe))
    assert stats["token_pruned_calls"] > 0 and stats["token_kept_share"] < 1.0, stats
    full = max(seen)
    assert full == 16 and min(seen) < full  # 4 x 4 grid; pruned calls see only the kept tokens
    # the first three steps and every max_consecutive_skips-th step (6) are full refreshes
    assert stats["token_pruned_steps"] == [3, 4, 5, 7]
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out.float()).all() and not torch.equal(out, base)
    # remove() leaves the blocks untouched: no hooks, exact output
    assert all(getattr(b, "_diffusers_hook", None) is None for b in _blocks(pipe))
    assert torch.equal(run(pipe, "sd", num_inference_steps=STEPS), base)


def test_batch2_cfg_and_stacked_with_step_skipping(sd):
    pipe, _ = sd
    with diffboost.accelerated(pipe, TOKENS):
        out = run(pipe, "sd", num_inference_steps=STEPS, num_images_per_prompt=2, guidance_scale=5.0)
        stats = _stats(pipe)
        again = run(pipe, "sd", num_inference_steps=6, guidance_scale=5.0)
    assert out.shape[0] == 2 and torch.isfinite(out.float()).all()
    assert stats["token_pruned_calls"] > 0
    assert torch.isfinite(again.float()).all()
    both = SADA(acc_range=(3, STEPS), schedule=(5,), max_consecutive_skips=3, token_sparsity=True, token_max_downsample=2)
    with diffboost.accelerated(pipe, both):
        out = run(pipe, "sd", num_inference_steps=STEPS)
        stats = _stats(pipe)
    assert stats["skipped_steps"] == [5] and 5 not in stats["token_pruned_steps"]
    assert torch.isfinite(out.float()).all()


def test_kept_tokens_grid():
    stable = torch.zeros(4, 5, dtype=torch.bool)
    kept = kept_tokens(stable, 3, 3, phase=0)
    assert kept.tolist() == [0, 3, 15, 18]  # one per window, partial edge windows included
    kept = kept_tokens(stable, 3, 3, phase=8)  # offset (2, 2), clamped inside partial windows
    assert kept.tolist() == [12, 14, 17, 19]
    unstable = stable.clone()
    unstable[1, 1] = True
    assert 6 in kept_tokens(unstable, 3, 3, phase=0).tolist()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(token_sparsity="yes"), TypeError),
        (dict(sx=0), ValueError),
        (dict(sy=1.5), TypeError),
        (dict(sx=1, sy=1), ValueError),
        (dict(token_max_downsample=3), ValueError),
    ],
)
def test_invalid_fields(kwargs, error):
    with pytest.raises(error):
        SADA(**kwargs)


def test_unsupported_family_is_clear():
    pipe = make_flux()
    with pytest.raises(UnsupportedPipelineError, match="token_sparsity"):
        diffboost.apply(pipe, SADA(token_sparsity=True))
    assert getattr(pipe.transformer, "_diffusers_hook", None) is None or not pipe.transformer._diffusers_hook.hooks


def test_step_after_a_skip_still_prunes(sd, monkeypatch):
    """Right after a skipped step the newest drift is SADA's own extrapolation (for flow matching its
    second difference is 0 by construction): the token rule uses the last map built from real drifts."""
    pipe, _ = sd
    step, seen, maps_from = [0], [], []
    original = SADARuntime._m
    monkeypatch.setattr(
        SADARuntime, "_m", lambda self, st: maps_from.append(tuple(p.step for p in st.trajectory)) or original(self, st)
    )

    def on_step_end(p, i, t, kwargs):
        step[0] = i + 1
        return kwargs

    handles = [b.attn1.register_forward_pre_hook(lambda m, a, k: seen.append((step[0], a[0].shape[1])), with_kwargs=True)
               for b in _blocks(pipe)]
    plugin = SADA(acc_range=(3, STEPS), schedule=(4,), max_consecutive_skips=4, token_sparsity=True, token_max_downsample=2)
    try:
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "sd", num_inference_steps=STEPS, callback_on_step_end=on_step_end)
            stats = _stats(pipe)
    finally:
        for h in handles:
            h.remove()
    assert stats["skipped_steps"] == [4]
    assert 5 in stats["token_pruned_steps"], stats
    assert min(n for s, n in seen if s == 5) < 16, "the step after the skip computed every token"
    assert not any(s == 4 for s, _ in seen), "the skipped step ran the UNet"
    assert (2, 3, 4) not in maps_from and (1, 2, 3) in maps_from, maps_from
    assert torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------------------------
# which tokens are pruned, on constructed stability maps (issue #19): hand-computed answers
# ----------------------------------------------------------------------------------------------

import re
from types import SimpleNamespace

from diffusers.hooks import HookRegistry

from diffboost.samplers.sada_tokens import PrunedBlock, TokenSparsity, install_tokens
from diffboost.tokens.merging import _Grid


def test_kept_tokens_windows_move_with_the_step():
    # 4 x 5 grid, 3-row x 2-column windows: window rows {0, 1, 2}, {3}; window columns {0, 1}, {2, 3}, {4}
    stable = torch.zeros(4, 5, dtype=torch.bool)
    table = {
        0: [0, 2, 4, 15, 17, 19],  # offset (0, 0)
        3: [6, 8, 9, 16, 18, 19],  # offset (1, 1): row 1, columns 1, 3 and 4 (clamped into the last column)
        4: [10, 12, 14, 15, 17, 19],  # offset (2, 0): row 2, and row 3 clamped into the one-row window
        7: [1, 3, 4, 16, 18, 19],  # 7 mod 6 = 1: offset (0, 1)
        5: [11, 13, 14, 16, 18, 19],  # offset (2, 1)
    }
    for phase, kept in table.items():
        assert kept_tokens(stable, 2, 3, phase).tolist() == kept, phase
    # 1 x 4 windows on a 2 x 8 grid: one token per 4 columns of each row
    assert kept_tokens(torch.zeros(2, 8, dtype=torch.bool), 4, 1, 6).tolist() == [2, 6, 10, 14]
    # unstable tokens are kept as well, the result stays sorted
    unstable = stable.clone()
    unstable[0, 1] = unstable[3, 0] = True
    assert kept_tokens(unstable, 2, 3, 3).tolist() == [1, 6, 8, 9, 15, 16, 18, 19]
    assert kept_tokens(torch.ones(4, 5, dtype=torch.bool), 2, 3, 0).tolist() == list(range(20))


class _Runtime(SimpleNamespace):
    """What TokenSparsity reads of the SADA runtime: the config and the call state."""


def _tokens(token_map, step=5, pruned=True, max_downsample=2, sx=2, sy=2):
    cfg = SimpleNamespace(token_max_downsample=max_downsample, sx=sx, sy=sy)
    state = SimpleNamespace(token_pruned=pruned, token_map=token_map, step=step)
    return TokenSparsity(_Runtime(cfg=cfg, state=state))


def _grid(h, w):
    grid = _Grid()
    grid.size = (h, w)
    return grid


def test_plan_prunes_stable_tokens_and_keeps_unstable_ones():
    m = -torch.ones(8, 8)
    m[0, 1] = 0.0  # m = 0 counts as unstable (m >= 0)
    m[5, 6] = 0.5
    m[7, 7] = -1e-6  # just stable
    tokens = _tokens(m, step=5)  # phase 5 mod 4 = 1: offset (0, 1) in each 2 x 2 window
    grid = _grid(8, 8)
    # a 4 x 4 block (downsample 2): max over 2 x 2 cells -> unstable cells (0, 0) and (2, 3)
    assert tokens.plan(grid, 16).tolist() == [0, 1, 3, 9, 11]
    # the 8 x 8 level itself (downsample 1 <= 2): unstable tokens (0, 1) = 1 and (5, 6) = 46
    assert tokens.plan(grid, 64).tolist() == sorted({1, 46} | {r * 8 + c for r in (0, 2, 4, 6) for c in (1, 3, 5, 7)})
    # a 2 x 2 block (downsample 4 > token_max_downsample 2), and token counts that are no level: all tokens
    assert tokens.plan(grid, 4) is None and tokens.plan(grid, 15) is None
    # allowed down to downsample 4: one 2 x 2 window keeps token 1, the 4 x 4 cells 0 and 3 are unstable
    assert _tokens(m, max_downsample=4).plan(grid, 4).tolist() == [0, 1, 3]
    # the plan is made once per (step, level) and reused by every block and branch of that step
    first = tokens.plan(grid, 16)
    assert tokens.plan(grid, 16) is first
    tokens.runtime.state.step = 6  # phase 2: offset (1, 0)
    assert tokens.plan(grid, 16).tolist() == [0, 4, 6, 11, 12, 14]
    tokens.reset()
    assert tokens._kept == {}


def test_plan_pools_odd_grids_in_ceil_mode():
    m = -torch.ones(7, 7)
    m[6, 6] = 1.0  # the bottom-right latent token lies in the partial cell (3, 3) of the 4 x 4 level
    tokens = _tokens(m, step=0)
    assert tokens.plan(_grid(7, 7), 16).tolist() == [0, 2, 8, 10, 15]
    # a map whose pooled shape is not the block's grid: no plan (computed in full)
    assert _tokens(-torch.ones(6, 6), step=0).plan(_grid(7, 7), 16) is None


def test_plan_only_on_pruned_steps_with_a_map():
    m = -torch.ones(4, 4)
    assert _tokens(m, pruned=False).plan(_grid(4, 4), 16) is None
    assert _tokens(None, pruned=True).plan(_grid(4, 4), 16) is None
    assert _tokens(m, pruned=True).plan(_grid(4, 4), 16).tolist() == [1, 3, 9, 11]  # step 5, offset (0, 1)
    assert _tokens(m, max_downsample=1).plan(_grid(4, 4), 16) is not None  # downsample 1 <= 1


class _Block(torch.nn.Module):
    """A transformer block stand-in: out = 10 * x + shift, recording how many tokens it computed."""

    def __init__(self):
        super().__init__()
        self.shift, self.seen = 0.0, []

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None):
        self.seen.append(hidden_states.shape[1])
        return 10 * hidden_states + self.shift


def test_pruned_block_computes_kept_tokens_and_takes_the_rest_from_its_cache():
    m = -torch.ones(4, 4)
    m[3, 0] = 0.25  # token 12 unstable
    tokens = _tokens(m, step=0, pruned=False)
    block = _Block()
    HookRegistry.check_if_exists_or_initialize(block).register_hook(PrunedBlock(tokens, _grid(4, 4)), "test")
    x = torch.arange(32.0).reshape(1, 16, 2)
    first = block(x)  # a full step: computes everything, fills the cache
    assert torch.equal(first, 10 * x) and block.seen == [16]
    # a pruned step: offset (0, 0) keeps 0, 2, 8, 10 plus the unstable 12
    tokens.runtime.state.token_pruned = True
    block.shift = 1.0
    y = x + 1000
    out = block(y)
    kept = [0, 2, 8, 10, 12]
    assert block.seen[-1] == 5
    pruned = [i for i in range(16) if i not in kept]
    assert torch.equal(out[:, kept], 10 * y[:, kept] + 1) and torch.equal(out[:, pruned], first[:, pruned])
    assert tokens.stats() == {"token_blocks": 0, "token_pruned_calls": 1, "token_kept_share": round(5 / 16, 4)}
    # the next pruned step builds on the cache that step left (fresh tokens included)
    out2 = block(y + 1000)
    assert torch.equal(out2[:, pruned], first[:, pruned]) and torch.equal(out2[:, kept], 10 * (y[:, kept] + 1000) + 1)
    assert (tokens.pruned_calls, tokens.tokens_in, tokens.tokens_out) == (2, 32, 10)
    # in full: an attention mask, a cache of another shape, every token kept
    assert torch.equal(block(y, torch.ones(1, 16)), 10 * y + 1) and block.seen[-1] == 16
    batch = torch.zeros(2, 16, 2)
    assert torch.equal(block(batch), batch * 10 + 1) and block.seen[-1] == 16  # the cache held batch 1
    tokens.runtime.state.token_map = torch.ones(4, 4)
    tokens.runtime.state.step = 1
    assert torch.equal(block(batch), batch * 10 + 1) and block.seen[-1] == 16
    assert tokens.pruned_calls == 2
    # reset_state forgets the cache: the next call is computed in full even on a pruned step
    block._diffusers_hook.reset_stateful_hooks()
    tokens.runtime.state.token_map, tokens.runtime.state.step = m, 2
    assert torch.equal(block(y), 10 * y + 1) and block.seen[-1] == 16
    out = block(y + 5)  # step 2, offset (1, 0): 4, 6, 14 and the unstable 12 (a window's own token)
    assert block.seen[-1] == 4 and torch.equal(out[:, [4, 6, 12, 14]], 10 * (y[:, [4, 6, 12, 14]] + 5) + 1)
    assert torch.equal(out[:, [0, 1, 2, 3]], 10 * y[:, [0, 1, 2, 3]] + 1)


def test_install_tokens_family_rule():
    runtime = _Runtime(cfg=SimpleNamespace(token_max_downsample=1, sx=2, sy=2), state=None)
    for kind, family in (("transformer", "sd"), ("unet", "pixart"), ("transformer", "flux")):
        adapter = SimpleNamespace(kind=kind, family=family)
        message = (
            f"SADA(token_sparsity=True) supports the UNet families sd, sdxl, not {family}: token-wise sparsity needs "
            "BasicTransformerBlocks on a 2-D latent grid (use token_sparsity=False for step-wise SADA)"
        )
        with pytest.raises(UnsupportedPipelineError, match=f"^{re.escape(message)}$"):
            install_tokens(runtime, adapter)


def test_token_statistics():
    tokens = _tokens(None)
    assert tokens.stats() == {"token_blocks": 0, "token_pruned_calls": 0, "token_kept_share": 1.0}
    tokens.pruned_calls, tokens.tokens_in, tokens.tokens_out = 3, 48, 16
    assert tokens.stats()["token_kept_share"] == 0.3333
    tokens.reset()
    assert (tokens.pruned_calls, tokens.tokens_in, tokens.tokens_out) == (0, 0, 0)


def test_install_tokens_hooks_every_transformer_block(sd):
    from diffboost.plugins.adapters import PipelineAdapter
    from diffboost.samplers.sada_tokens import BLOCK_HOOK, GRID_HOOK

    pipe, _ = sd
    state = SimpleNamespace(token_pruned=False, token_map=None, step=0)
    tokens = install_tokens(_Runtime(cfg=SimpleNamespace(token_max_downsample=2, sx=2, sy=2), state=state), PipelineAdapter(pipe))
    blocks = _blocks(pipe)
    try:
        grid_hook = pipe.unet._diffusers_hook.get_hook(GRID_HOOK)
        assert (grid_hook.arg, grid_hook.patch) == ("sample", 1)
        hooks = [b._diffusers_hook.get_hook(BLOCK_HOOK) for b in blocks]
        assert all(isinstance(h, PrunedBlock) and h.tokens is tokens and h.grid is grid_hook.grid for h in hooks)
        assert tokens.blocks == len(blocks) > 0 and len(tokens.hooks) == 2
        context = torch.zeros(1, 8, pipe.unet.config.cross_attention_dim)
        with torch.no_grad():
            pipe.unet(sample=torch.zeros(1, 4, 8, 6), timestep=torch.tensor(1), encoder_hidden_states=context)
        assert grid_hook.grid.size == (8, 6)
    finally:
        tokens.remove()
    assert getattr(pipe.unet, "_diffusers_hook", None) is None
    assert all(getattr(b, "_diffusers_hook", None) is None for b in blocks) and tokens.hooks == []


def test_install_tokens_without_transformer_blocks_removes_its_hooks():
    module = torch.nn.Linear(2, 2)
    adapter = type("A", (), {"kind": "unet", "family": "sd", "__iter__": lambda self: iter([SimpleNamespace(module=module, blocks=[module])])})()
    with pytest.raises(UnsupportedPipelineError, match=r"^SADA\(token_sparsity=True\) found no BasicTransformerBlock in the UNet$"):
        install_tokens(_Runtime(cfg=None, state=None), adapter)
    assert getattr(module, "_diffusers_hook", None) is None
