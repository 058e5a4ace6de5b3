"""Every supported family x every cache: exactness when never skipping, restore after remove, and
that skipping really skips (fewer full steps, output changes but stays finite)."""

import pytest
import torch

import diffboost
from diffboost import AdaptiveBlockCache, EasyCache, ErrorControlledCache, TaylorSeer
from factories import FAMILIES, run

NEVER_SKIP = [
    TaylorSeer(interval=1),
    TaylorSeer(interval=1, lite=True),
    TaylorSeer(interval=1, granularity="block"),
    AdaptiveBlockCache(threshold=0.0, warmup=0),
    ErrorControlledCache(tolerance=0.0, warmup=0),
    EasyCache(threshold=0.0),
]
SKIPPING = [
    TaylorSeer(interval=3, warmup=1, order=2),
    TaylorSeer(interval=3, warmup=1, granularity="block"),
    AdaptiveBlockCache(threshold=10.0, warmup=1, taylor_order=1),
    ErrorControlledCache(tolerance=10.0, warmup=2),
    EasyCache(threshold=10.0, warmup=2),
]
STEPS = 6


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pipe(request):
    family = request.param
    pipe = FAMILIES[family]()
    return family, pipe, run(pipe, family, num_inference_steps=STEPS)


def test_never_skipping_is_bit_identical_and_remove_restores(family_pipe):
    family, pipe, base = family_pipe
    for plugin in NEVER_SKIP:
        diffboost.apply(pipe, plugin)
        out = run(pipe, family, num_inference_steps=STEPS)
        stats = diffboost.describe(pipe)["last_call"]
        diffboost.remove(pipe)
        assert torch.equal(out, base), f"{family}: {plugin} changed the output"
        for item in stats:
            for branch in item["branches"].values():
                assert branch["forecast"] == 0 and branch["full"] == STEPS
        assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base), f"{family}: remove() after {plugin}"
    assert not hasattr(pipe, "_diffboost_handle")


def test_skipping_configs_skip_and_stay_finite(family_pipe):
    family, pipe, base = family_pipe
    for plugin in SKIPPING:
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, family, num_inference_steps=STEPS)
            stats = diffboost.describe(pipe)["last_call"]
        assert out.shape == base.shape and out.dtype == base.dtype
        assert torch.isfinite(out.float()).all()
        assert not torch.equal(out, base), f"{family}: {plugin} skipped nothing"
        forecast = sum(b["forecast"] for item in stats for b in item["branches"].values())
        assert forecast > 0, f"{family}: {plugin} reports no forecast step: {stats}"
        assert all(0 < item["flops_saved_est"] < 1 for item in stats)
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)


def test_every_preset_runs_and_remove_restores(family_pipe):
    family, pipe, base = family_pipe
    for name in diffboost.PRESETS:
        with diffboost.accelerated(pipe, name):
            out = run(pipe, family, num_inference_steps=10)
            summary = diffboost.describe(pipe)["summary"]
        assert torch.isfinite(out.float()).all() and summary["computed"] <= summary["denoiser_calls"]
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)


@pytest.mark.parametrize("plugin", [TaylorSeer(interval=2, warmup=1), EasyCache(threshold=10.0, warmup=2)],
                         ids=["taylorseer", "easycache"])
def test_state_resets_between_calls_of_different_shapes(family_pipe, plugin):
    """Different step counts, batch sizes and CFG settings in sequence on one patched pipeline."""
    family, pipe, base = family_pipe
    with diffboost.accelerated(pipe, plugin):
        first = run(pipe, family, num_inference_steps=STEPS)
        run(pipe, family, num_inference_steps=3)
        batch = run(pipe, family, num_inference_steps=STEPS, prompt=["a red circle", "a blue square"])
        again = run(pipe, family, num_inference_steps=STEPS)
        stats = diffboost.describe(pipe)["last_call"]
    assert torch.equal(first, again), "state leaked from one call into the next"
    assert batch.shape[0] == 2 * first.shape[0]
    for item in stats:
        for branch in item["branches"].values():
            assert branch["steps"] == STEPS


def test_a_second_call_during_a_call_is_refused_and_the_first_is_unharmed(family_pipe):
    """One pipeline, two threads: the call that starts while another one's denoising loop runs gets a
    ConcurrentCallError before it touches anything; the running call finishes bit-identical."""
    import threading

    family, pipe, base = family_pipe
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    inside, go, seen = threading.Event(), threading.Event(), []

    def pause_at_the_second_denoiser_call(module, args):
        seen.append(1)
        if len(seen) == 2:
            inside.set()
            go.wait(60)

    hook = denoiser.register_forward_pre_hook(pause_at_the_second_denoiser_call)
    diffboost.apply(pipe, TaylorSeer(interval=1))
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=run(pipe, family, num_inference_steps=STEPS)))
    try:
        worker.start()
        assert inside.wait(120)
        with pytest.raises(diffboost.ConcurrentCallError, match="is already running a call .started by thread"):
            run(pipe, family, num_inference_steps=STEPS)
    finally:
        go.set()
        worker.join(300)
        hook.remove()
    try:
        assert torch.equal(result["out"], base)
        # calls one after the other, from any thread, are fine
        assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)
    finally:
        diffboost.remove(pipe)
    assert "progress_bar" not in vars(pipe) and "check_inputs" not in vars(pipe)


def test_every_block_layout_is_what_the_block_takes_and_returns(family_pipe):
    """The layout diffboost uses for each block (its table, diffusers' block metadata or a registration)
    must be what the block really does: the hidden output has the hidden input's shape, and the text
    stream likewise where the block returns one. The default calls keep the text and image token counts
    apart, so that a swapped (text, image) pair cannot pass."""
    from diffboost.plugins.adapters import PipelineAdapter

    family, pipe, base = family_pipe
    adapter = PipelineAdapter(pipe)
    if adapter.kind == "unet":
        pytest.skip("UNet blocks are cached whole (down/mid/up blocks); they have no stream layout")
    seen, handles = [], []
    for d in adapter:
        for name, block in zip(d.block_names, d.blocks):
            io = d.block_io(block)

            def record(module, args, kwargs, out, io=io, name=name):
                (h, e), (h_out, e_out) = io.inputs(args, kwargs), io.split(out)
                seen.append((name, io.outputs, h, e, h_out, e_out))

            handles.append(block.register_forward_hook(record, with_kwargs=True))
    try:
        run(pipe, family, num_inference_steps=2)
    finally:
        for handle in handles:
            handle.remove()
    assert {name for name, *_ in seen} == {n for d in adapter for n in d.block_names}
    for name, layout, h, e, h_out, e_out in seen:
        assert h_out.shape == h.shape, f"{family} {name} ({layout}): hidden {tuple(h.shape)} -> {tuple(h_out.shape)}"
        if layout != "h":
            assert e is not None and e.shape[1] != h.shape[1], f"{family} {name}: text and image token counts must differ"
            if e_out is not None:
                assert e_out.shape == e.shape, f"{family} {name} ({layout}): text {tuple(e.shape)} -> {tuple(e_out.shape)}"
