"""TaylorSeer on real pipelines: what is forecast, from which observations, and what is skipped.

The forecasting math itself is pinned in test_taylor.py; these tests pin the plumbing: every
forecast step returns exactly the Taylor forecast of the outputs recorded on the full steps of the
same call (the right observations, the right step index k), skipped modules do not run, and the
schedule is the one the policy promises.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils import _pytree as pytree

import diffboost
from diffboost import TaylorSeer
from diffboost.caches.taylor import TaylorFactors
from diffboost.plugins.runtime import ClockState
from factories import make_flux, make_sd, run


@pytest.fixture(scope="module")
def flux():
    return make_flux()


def _record(module: torch.nn.Module, calls: list, inputs: list | None = None) -> list:
    """Record what ``module`` returns (and, optionally, its hidden/encoder inputs) at every call."""

    def post(mod, args, kwargs, out):
        calls.append(pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out))

    def pre(mod, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        inputs.append((h.clone(), None if e is None else e.clone()))

    handles = [module.register_forward_hook(post, with_kwargs=True)]
    if inputs is not None:
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def _count_calls(module: torch.nn.Module, counter: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda mod, args: counter.append(1))


def _expected_forecasts(outputs: list, full_steps: list[int], order: int) -> dict[int, object]:
    """Replays the observations of the full steps through TaylorFactors and forecasts every other step."""
    expected, factors = {}, TaylorFactors(order)
    for step, out in enumerate(outputs):
        if step in full_steps:
            factors.update(out, step)
        else:
            expected[step] = factors.forecast(step)
    return expected


def _equal(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("order", [0, 1, 2])
def test_module_forecasts_are_the_taylor_series_of_the_full_steps(flux, order):
    blocks = flux.transformer.transformer_blocks
    single = flux.transformer.single_transformer_blocks
    attn_out, proj_out, attn_runs, single_attn_runs, mlp_out = [], [], [], [], []
    handles = _record(blocks[1].attn, attn_out) + _record(single[0].proj_out, proj_out)
    handles += [
        _count_calls(blocks[1].attn.to_q, attn_runs),
        _count_calls(single[0].attn.to_q, single_attn_runs),
        # the very tensor proj_mlp returns (a Linear has no child whose calls could be counted)
        single[0].proj_mlp.register_forward_hook(lambda mod, args, out: mlp_out.append(out)),
    ]
    try:
        with diffboost.accelerated(flux, TaylorSeer(interval=3, order=order, warmup=3)):
            run(flux, "flux", num_inference_steps=10)
            branch = diffboost.describe(flux)["last_call"][0]["branches"]["cond"]
    finally:
        for h in handles:
            h.remove()
    full = [0, 1, 2, 5, 8]
    assert branch["full_steps"] == full and branch["forecast"] == 5 and branch["steps"] == 10
    # full steps run the modules; forecast steps run neither the forecast nor the skipped ones
    assert len(attn_runs) == len(single_attn_runs) == len(full)
    for step in range(10):  # proj_mlp's output is unused on forecast steps: its last one is returned
        last_full = max(s for s in full if s <= step)
        assert (mlp_out[step] is mlp_out[last_full]) == (step not in full or step == last_full)
    assert len(attn_out) == len(proj_out) == 10
    for outputs in (attn_out, proj_out):
        for step, value in _expected_forecasts(outputs, full, order).items():
            assert _equal(outputs[step], value), f"step {step} is not the order-{order} forecast"
    # the forecast really extrapolates: with order >= 1 the forecast steps differ from plain reuse
    if order:
        assert not torch.equal(proj_out[3], proj_out[2]) and not torch.equal(proj_out[4], proj_out[3])
    else:
        assert torch.equal(proj_out[3], proj_out[2]) and torch.equal(proj_out[4], proj_out[2])


def test_block_granularity_forecasts_each_blocks_residual(flux):
    order = 2
    blocks = [flux.transformer.transformer_blocks[0], flux.transformer.single_transformer_blocks[1]]
    outs, ins = [[], []], [[], []]
    handles = []
    for i, b in enumerate(blocks):
        handles += _record(b, outs[i], ins[i])
    inner: list = []
    handles.append(_count_calls(blocks[0].attn, inner))
    try:
        with diffboost.accelerated(flux, TaylorSeer(interval=2, order=order, warmup=2, granularity="block")):
            run(flux, "flux", num_inference_steps=8)
            stats = diffboost.describe(flux)["last_call"][0]
    finally:
        for h in handles:
            h.remove()
    full = [0, 1, 3, 5, 7]
    assert stats["branches"]["cond"]["full_steps"] == full and len(inner) == len(full)
    assert stats["modules"]["forecast"][0] == "transformer_blocks.0"
    for i, b in enumerate(blocks):
        io = diffboost.plugins.adapters.Denoiser("t", flux.transformer, [], []).block_io(b)
        residuals = []
        for (h, e), out in zip(ins[i], outs[i]):
            h_out, e_out = io.split(out)
            residuals.append((h_out - h, None if e_out is None or e is None else e_out - e))
        for step, (res_h, res_e) in _expected_forecasts(residuals, full, order).items():
            got_h, got_e = residuals[step]
            torch.testing.assert_close(got_h, res_h, rtol=1e-5, atol=1e-6)
            if res_e is not None:
                torch.testing.assert_close(got_e, res_e, rtol=1e-5, atol=1e-6)
        # the forecast steps are not plain reuse of the last residual
        assert not torch.allclose(residuals[2][0], residuals[1][0])


def test_lite_forecasts_the_denoiser_output(flux):
    outs: list = []
    handles = _record(flux.transformer, outs)
    blocks_run: list = []
    handles.append(_count_calls(flux.transformer.transformer_blocks[0], blocks_run))
    try:
        with diffboost.accelerated(flux, TaylorSeer(interval=4, order=1, warmup=1, lite=True)):
            run(flux, "flux", num_inference_steps=9)
            branch = diffboost.describe(flux)["last_call"][0]["branches"]["cond"]
    finally:
        for h in handles:
            h.remove()
    full = [0, 4, 8]  # one warm-up step, then every 4 steps
    assert branch["full_steps"] == full and len(blocks_run) == 3
    for step, value in _expected_forecasts(outs, full, 1).items():
        assert _equal(outs[step], value), step


def test_lite_nan_forecast_is_recomputed_and_reported_once(flux, caplog, monkeypatch):
    base = run(flux, "flux", num_inference_steps=5)
    original = TaylorFactors.forecast

    def poisoned(self, step):
        return pytree.tree_map(lambda t: t * float("nan") if isinstance(t, torch.Tensor) else t, original(self, step))

    monkeypatch.setattr(TaylorFactors, "forecast", poisoned)
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1, lite=True)):
            out = run(flux, "flux", num_inference_steps=5)
            branch = diffboost.describe(flux)["last_call"][0]["branches"]["cond"]
    assert torch.equal(out, base)
    # every step after the first is planned as a forecast (a fallback is a full step), poisoned, recomputed
    assert branch["full_steps"] == [0, 1, 2, 3, 4] and branch["nan_fallbacks"] == 4
    assert sum("NaN/Inf" in r.message for r in caplog.records) == 1


def test_lite_without_finite_check_returns_the_forecast(flux, monkeypatch):
    monkeypatch.setattr(TaylorFactors, "forecast", lambda self, step: pytree.tree_map(
        lambda t: torch.full_like(t, float("nan")) if isinstance(t, torch.Tensor) else t, self.latest()))
    with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1, lite=True, check_finite=False)):
        out = run(flux, "flux", num_inference_steps=4)
        branch = diffboost.describe(flux)["last_call"][0]["branches"]["cond"]
    assert branch["nan_fallbacks"] == 0 and branch["full_steps"] == [0, 2]
    assert torch.isnan(out).all()


def test_unet_forecasts_the_last_up_block_and_skips_the_others():
    pipe = make_sd()
    unet = pipe.unet
    outs: list = []
    handles = _record(unet.up_blocks[-1], outs)
    try:
        with diffboost.accelerated(pipe, TaylorSeer(interval=3, order=1, warmup=2)):
            run(pipe, "sd", num_inference_steps=8)
            stats = diffboost.describe(pipe)["last_call"][0]
    finally:
        for h in handles:
            h.remove()
    full = [0, 1, 4, 7]
    assert stats["branches"]["default"]["full_steps"] == full
    assert len(outs) == 8
    for step, value in _expected_forecasts(outs, full, 1).items():
        assert _equal(outs[step], value), step
    assert stats["modules"]["forecast"] == ["up_blocks.1"]
    assert "down_blocks.0" in stats["modules"]["skipped (output unused on forecast steps)"]


def test_unet_forecast_steps_skip_the_blocks_children():
    pipe = make_sd()
    resnet_runs: list = []
    h = _count_calls(pipe.unet.down_blocks[0].resnets[0], resnet_runs)
    try:
        with diffboost.accelerated(pipe, TaylorSeer(interval=3, order=1, warmup=2)):
            run(pipe, "sd", num_inference_steps=8)
    finally:
        h.remove()
    assert len(resnet_runs) == 4  # full steps 0, 1, 4, 7 only


@pytest.mark.parametrize(
    "kwargs, steps, full",
    [
        (dict(interval=1, warmup=0), 5, [0, 1, 2, 3, 4]),
        (dict(interval=2, warmup=0), 7, [0, 2, 4, 6]),
        (dict(interval=3, warmup=2, final_full_steps=2), 12, [0, 1, 4, 7, 10, 11]),
        (dict(interval=4, warmup=3), 10, [0, 1, 2, 6]),
        (dict(interval=5, warmup=0, final_full_steps=1), 8, [0, 5, 7]),
    ],
)
def test_policy_schedule(kwargs, steps, full):
    """The policy alone, driven like the step clock drives it."""
    plugin = TaylorSeer(**kwargs)
    st = ClockState()
    got = []
    for step in range(steps):
        st.step = step
        if st.last_full < 0 or plugin.policy(st, step, steps - step):
            st.last_full = step
            got.append(step)
    assert got == full
    assert plugin.never_skips() == (plugin.interval == 1)


def test_policy_without_a_known_step_count_ignores_final_full_steps():
    plugin = TaylorSeer(interval=3, warmup=1, final_full_steps=5)
    st = ClockState()
    st.last_full = 0
    assert [plugin.policy(st, s, None) for s in (1, 2, 3)] == [False, False, True]


def test_defaults_are_the_documented_ones():
    p = TaylorSeer()
    assert (p.interval, p.order, p.warmup, p.final_full_steps, p.lite, p.granularity, p.check_finite) == (
        5, 1, 3, 0, False, "module", True)


@pytest.mark.parametrize("family", ["sd3", "pixart_sigma"])
def test_block_granularity_on_blocks_without_a_text_stream_output(family):
    """SD3's last block drops the text stream (returns None for it); PixArt's blocks return the image
    stream only: forecast steps keep those layouts."""
    from factories import make_pixart_sigma, make_sd3

    pipe = (make_sd3 if family == "sd3" else make_pixart_sigma)()
    last = pipe.transformer.transformer_blocks[-1]
    outs: list = []
    handles = _record(last, outs)
    try:
        with diffboost.accelerated(pipe, TaylorSeer(interval=2, order=1, warmup=1, granularity="block")):
            out = run(pipe, family, num_inference_steps=5)
            branch = next(iter(diffboost.describe(pipe)["last_call"][0]["branches"].values()))
    finally:
        for h in handles:
            h.remove()
    assert branch["full_steps"] == [0, 2, 4] and torch.isfinite(out).all()
    for o in outs:  # forecast steps return what the block itself returns
        if family == "sd3":
            assert isinstance(o, tuple) and o[0] is None and isinstance(o[1], torch.Tensor)
        else:
            assert isinstance(o, torch.Tensor)


def test_transformer_units_of_each_block_layout():
    from diffboost.caches.taylorseer import _transformer_units

    lin = lambda: torch.nn.Linear(2, 2)  # noqa: E731

    class Single(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_mlp, self.proj_out, self.attn = lin(), lin(), lin()

    class Dual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ff, self.ff_context, self.proj_out = lin(), lin(), lin(), lin()

    s, d = Single(), Dual()
    assert _transformer_units(s) == [(s.proj_out, True), (s.proj_mlp, False), (s.attn, False)]
    # a block with an output projection but no fused MLP is not single-stream: attention and
    # feed-forward are forecast, in the documented order
    assert _transformer_units(d) == [(d.attn, True), (d.ff, True), (d.ff_context, True)]


@pytest.mark.parametrize("lite", [False, True])
def test_describe_reports_the_call_exactly(flux, lite):
    plugin = TaylorSeer(interval=3, warmup=2, lite=lite)
    with diffboost.accelerated(flux, plugin):
        run(flux, "flux", num_inference_steps=8)
        entry = diffboost.describe(flux)["last_call"][0]
    den = flux.transformer
    total = sum(p.numel() for p in den.parameters())
    if lite:
        units = [den]
        modules = {"forecast": ["<denoiser>"]}
    else:
        units = [m for b in den.transformer_blocks for m in (b.attn, b.ff, b.ff_context)]
        units += [m for b in den.single_transformer_blocks for m in (b.proj_out, b.proj_mlp, b.attn)]
        modules = entry["modules"]
        assert len(modules["forecast"]) == 8 and len(modules["skipped (output unused on forecast steps)"]) == 4
    skipped = sum(p.numel() for m in units for p in m.parameters())
    branch = entry["branches"]["cond"]
    assert branch["full_steps"] == [0, 1, 4, 7]
    assert entry == {
        "denoiser": "transformer",
        "plugin": repr(plugin),
        "branches": {"cond": {"steps": 8, "full": 4, "forecast": 4, "full_steps": [0, 1, 4, 7], "nan_fallbacks": 0}},
        "hooked_modules": 1 + (0 if lite else 12),
        "modules": modules,
        "flops_saved_est": round(skipped / total * 4 / 8, 4),
        # the common part of the typed statistics: the forecast steps are the reused calls
        "reused_calls": 4,
        "reused_per_pass": {"cond": 4},
        "skipped_steps": [2, 3, 5, 6],
    }
    assert 0 < entry["flops_saved_est"] <= 0.5  # at most the share of forecast steps


def test_describe_in_block_granularity_and_before_any_call(flux):
    from diffusers.hooks import HookRegistry

    from diffboost.caches.taylorseer import HOOK_NAME

    plugin = TaylorSeer(interval=3, warmup=2, granularity="block")
    den = flux.transformer
    with diffboost.accelerated(flux, plugin):
        before = diffboost.describe(flux)["last_call"][0]
        assert before["branches"] == {} and before["flops_saved_est"] == 0.0
        # the hooks are registered under the plugin's own name (how remove() and other tools find them)
        assert HookRegistry.check_if_exists_or_initialize(den.transformer_blocks[0]).get_hook(HOOK_NAME) is not None
        run(flux, "flux", num_inference_steps=8)
        entry = diffboost.describe(flux)["last_call"][0]
    blocks = [*den.transformer_blocks, *den.single_transformer_blocks]
    skipped = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in den.parameters())
    names = [f"transformer_blocks.{i}" for i in range(len(den.transformer_blocks))]
    names += [f"single_transformer_blocks.{i}" for i in range(len(den.single_transformer_blocks))]
    assert entry == {
        "denoiser": "transformer",
        "plugin": repr(plugin),
        "branches": {"cond": {"steps": 8, "full": 4, "forecast": 4, "full_steps": [0, 1, 4, 7], "nan_fallbacks": 0}},
        "hooked_modules": 1 + len(blocks),
        "modules": {"forecast": names},
        "flops_saved_est": round(skipped / total * 4 / 8, 4),
        # the common part of the typed statistics: the forecast steps are the reused calls
        "reused_calls": 4,
        "reused_per_pass": {"cond": 4},
        "skipped_steps": [2, 3, 5, 6],
    }


def test_module_nan_forecast_is_recomputed_and_names_taylorseer(flux, caplog, monkeypatch):
    base = run(flux, "flux", num_inference_steps=4)
    original = TaylorFactors.forecast
    monkeypatch.setattr(TaylorFactors, "forecast", lambda self, step: pytree.tree_map(
        lambda t: t * float("nan") if isinstance(t, torch.Tensor) else t, original(self, step)))
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1)):
            assert torch.equal(run(flux, "flux", num_inference_steps=4), base)
            assert diffboost.describe(flux)["last_call"][0]["branches"]["cond"]["nan_fallbacks"] == 3
    (message,) = [r.getMessage() for r in caplog.records if "NaN/Inf" in r.getMessage()]
    assert message.startswith("TaylorSeer: a forecast step (step 1)")
    with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1, check_finite=False)):
        assert torch.isnan(run(flux, "flux", num_inference_steps=4)).all()


def test_a_module_run_twice_in_a_block_keeps_one_series_per_run():
    """CogView4's blocks run their feed-forward on the image tokens, then on the text tokens: each run
    of the module in a denoiser call has its own history, so a forecast has the right stream's shape
    and is the Taylor forecast of that stream's outputs."""
    from diffboost.caches.taylorseer import ForecastUnitHook
    from factories import make_cogview4

    pipe = make_cogview4()
    ff = pipe.transformer.transformer_blocks[0].ff
    outs: list = []
    series: dict = {}

    def snapshot(pipe, i, t, kwargs):  # the hook states live until the end of the call
        hook = ff._diffusers_hook.get_hook("diffboost.taylorseer")
        assert isinstance(hook, ForecastUnitHook)
        for branch, calls in hook.state.states().items():
            series[branch] = [tuple(s.factors.latest().shape) for s in calls.calls]
        return {}

    inner: list = []
    with diffboost.accelerated(pipe, TaylorSeer(interval=3, warmup=1, order=1)):
        handles = [ff.register_forward_hook(lambda m, a, out: outs.append(tuple(out.shape))),
                   ff.net[-1].register_forward_hook(lambda m, a, out: inner.append(1))]
        try:
            out = run(pipe, "cogview4", num_inference_steps=6, callback_on_step_end=snapshot)
        finally:
            for handle in handles:
                handle.remove()
        stats = diffboost.describe(pipe)["last_call"][0]["branches"]
    assert torch.isfinite(out).all()
    assert set(stats) == {"cond", "uncond"} and all(b["forecast"] > 0 for b in stats.values())
    # two series per branch: image tokens (64) then text tokens (16)
    assert series == {b: [(1, 64, 32), (1, 16, 32)] for b in ("cond", "uncond")}
    # every call returns its own stream's shape (image, then text) ...
    assert outs == [(1, 64, 32), (1, 16, 32)] * (6 * 2)
    # ... and the module itself ran on full steps only, twice per branch
    assert len(inner) == 2 * sum(b["full"] for b in stats.values()) < len(outs)


def test_unit_calls_keep_one_series_per_run_within_a_denoiser_call():
    from diffboost.caches.taylorseer import _UnitCalls

    calls = _UnitCalls(order=1)
    a, b, c = calls.next(run=1), calls.next(run=1), calls.next(run=1)
    assert len({id(a), id(b), id(c)}) == 3 and calls.calls == [a, b, c]
    assert [calls.next(run=2), calls.next(run=2), calls.next(run=2)] == [a, b, c]  # the next run starts over
    assert calls.next(run=3) is a and calls.index == 1
    calls.reset()
    assert calls.calls == [] and calls.next(run=3) is not a


def test_a_refused_second_expert_leaves_the_first_one_untouched():
    """Wan 2.2 has two denoisers; when the second cannot take TaylorSeer, the first one's hooks are
    taken off again and the pipeline is as before."""
    from diffboost import UnsupportedPipelineError
    from factories import make_wan

    class Weird(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    pipe = make_wan(two_experts=True)
    pipe.transformer_2.blocks = torch.nn.ModuleList([Weird()])
    with pytest.raises(UnsupportedPipelineError, match="block class Weird"):
        diffboost.apply(pipe, TaylorSeer(granularity="block"))
    for den in (pipe.transformer, pipe.transformer_2):
        for module in den.modules():
            registry = getattr(module, "_diffusers_hook", None)
            assert (registry is None or not registry.hooks) and "forward" not in vars(module)
    assert not hasattr(pipe, "_diffboost_handle")
