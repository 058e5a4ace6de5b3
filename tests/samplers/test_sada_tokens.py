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
TOKENS = SADA(schedule=(), acc_range=(3, STEPS), max_interval=4, token_sparsity=True, token_max_downsample=2)


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
        SADA(schedule=(), acc_range=(3, STEPS), max_interval=1, token_sparsity=True, token_max_downsample=2),
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
    # the first three steps and every max_interval-th step (6) are full refreshes
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
    both = SADA(acc_range=(3, STEPS), schedule=(5,), max_interval=3, token_sparsity=True, token_max_downsample=2)
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
    plugin = SADA(acc_range=(3, STEPS), schedule=(4,), max_interval=4, token_sparsity=True, token_max_downsample=2)
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
