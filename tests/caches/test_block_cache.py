"""AdaptiveBlockCache (FBCache/DBCache) and ErrorControlledCache: their decision rules and what a
reused step computes.

The gate is driven directly with constructed probe residuals whose relative change (or forecast
error) is known, on both sides of the threshold; then, on real tiny pipelines, the schedule the
cache chose is checked against the rule recomputed from the probes recorded in the same run, and
a reused step's middle blocks are checked to return input + cached (or Taylor-forecast) residual.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffboost
from diffboost import AdaptiveBlockCache, ErrorControlledCache, UnsupportedPipelineError
from diffboost.caches.block_cache import _Core, _rel_l1
from diffboost.caches.taylor import TaylorFactors
from diffboost.plugins.runtime import ClockState, StepPlan
from factories import make_flux, make_sd, make_sd3, run


# ------------------------------------------------------------------------------------------------
# the gate on its own
# ------------------------------------------------------------------------------------------------


class _Clock:
    """What the gate reads from its step clock: the plan and the branch's last full step."""

    def __init__(self) -> None:
        self.plan = StepPlan()
        self.clock_state = ClockState()
        self.state = self

    def get_state(self) -> ClockState:
        return self.clock_state


def _drive(plugin, probes, forced=(), total_steps=None):
    """Feed one probe per step to the gate as the hooks do; returns (full steps, k per step, rel log)."""
    settings = plugin._settings() if isinstance(plugin, AdaptiveBlockCache) else _ecc_settings(plugin)
    clock = _Clock()
    core = _Core(settings, clock, unet=False)
    n = len(probes) if total_steps is None else total_steps
    full, ks = [], []
    for step, probe in enumerate(probes):
        plan = clock.plan
        plan.step, plan.full, plan.forced, plan.steps_left = step, True, step in forced, n - step
        core.gate(probe)
        st = core.state.get_state()
        if plan.full:
            st.res.update((torch.zeros(1), None), step)  # what the middle blocks record on a full step
            clock.clock_state.last_full = step
            full.append(step)
        ks.append(plan.k)
    return full, ks, list(core.state.get_state().rel)


def _ecc_settings(plugin: ErrorControlledCache):
    from diffboost.caches.block_cache import _Settings

    return _Settings(
        gate="forecast_error", threshold=plugin.tolerance, front=plugin.probe_blocks, back=0,
        warmup=plugin.warmup, max_cached=plugin.max_consecutive_skips, order=plugin.order,
        final_full=plugin.final_full_steps, check_finite=plugin.check_finite,
    )


def _const(value: float, n: int = 6) -> torch.Tensor:
    return torch.full((1, n), float(value))


def test_rel_l1_is_the_mean_absolute_difference_over_the_reference():
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    y = torch.tensor([1.5, -2.0, 2.0, 1.0])
    ref = torch.tensor([2.0, -2.0, 2.0, -2.0])
    assert _rel_l1(x, y, ref) == pytest.approx((0.5 + 0 + 1 + 1) / 4 / 2.0)
    assert _rel_l1(x, y, torch.zeros(4)) == float("inf")
    half = _rel_l1(x.half(), y.half(), ref.half())
    assert half == pytest.approx(0.3125)


@pytest.mark.parametrize("scale", [2.0**-10, 1.0, 2.0**10])
@pytest.mark.parametrize(
    "threshold, full, rel",
    [
        # by hand: step 1 changes by 1/4 from step 0; step 2 is compared with the last *full* step's
        # probe: 4 (rel 2/4) if step 1 was reused, 5 (rel 1/5) if step 1 was full
        (0.24, [0, 1], [0.25, 0.2]),
        (0.25, [0, 1], [0.25, 0.2]),  # rel == threshold is not below it: full
        (0.2500001, [0, 2], [0.25, 0.5]),
        (0.5, [0, 2], [0.25, 0.5]),
        (0.5000001, [0], [0.25, 0.5]),
    ],
)
def test_change_gate_is_relative_and_strict(scale, threshold, full, rel):
    """rel = mean|r - r_ref| / mean|r_ref| decides the same at any scale; reuse iff rel < threshold."""
    probes = [_const(4 * scale), _const(5 * scale), _const(6 * scale)]
    got_full, ks, got_rel = _drive(AdaptiveBlockCache(threshold=threshold, warmup=0, max_consecutive_skips=5), probes)
    assert got_full == full
    assert got_rel == pytest.approx(rel, rel=1e-6)


def test_change_gate_compares_with_the_last_full_step_not_the_last_step():
    # the probe drifts by 6% a step: each step alone is below 10%, but two steps add up
    probes = [_const(1.06**s) for s in range(6)]
    full, ks, rel = _drive(AdaptiveBlockCache(threshold=0.1, warmup=0, max_consecutive_skips=10), probes)
    assert full == [0, 2, 4]
    assert ks == [0, 1, 0, 1, 0, 1]
    assert rel == pytest.approx([0.06, 0.1236, 0.06, 0.1236, 0.06], rel=1e-4)


def test_max_cached_warmup_final_and_forced_steps_are_full():
    probes = [_const(1.0)] * 12  # nothing changes: every gated step would be reused
    plugin = AdaptiveBlockCache(threshold=0.5, warmup=3, max_consecutive_skips=2, final_full_steps=2)
    full, ks, rel = _drive(plugin, probes, forced={7})
    # warm-up 0-2; then two reuses, a full step; the forced step 7; the last two steps
    assert full == [0, 1, 2, 5, 7, 10, 11]
    assert ks == [0, 0, 0, 1, 2, 0, 1, 0, 1, 2, 0, 0]
    assert rel == [0.0] * 5  # steps 3, 4, 6, 8, 9 were gated; the others were never allowed


def test_threshold_zero_never_reuses_and_the_first_step_needs_a_reference():
    full, _, rel = _drive(AdaptiveBlockCache(threshold=0.0, warmup=0), [_const(1.0)] * 5)
    assert full == [0, 1, 2, 3, 4] and rel == [0.0] * 4
    assert AdaptiveBlockCache(threshold=0.0).never_skips() and not AdaptiveBlockCache(threshold=1e-9).never_skips()


def test_forecast_error_gate_refreshes_exactly_when_the_error_exceeds_the_tolerance():
    # probe residual: a line (order-1 forecasts exact) that bends at step 5 by a known amount
    values = [1.0 + 0.5 * s for s in range(5)] + [3.5 + 0.1, 4.0 + 0.1, 4.5 + 0.1]
    probes = [_const(v) for v in values]
    plugin = ErrorControlledCache(tolerance=0.02, order=1, warmup=2, max_consecutive_skips=10, final_full_steps=0)
    full, ks, rel = _drive(plugin, probes)
    # steps 2-4 are forecast exactly (error 0); step 5 misses by 0.1 / 3.6 = 2.8% > 2%: refresh;
    # the factors now span steps 1 and 5 (slope 2.1 / 4 = 0.525): step 6 forecasts 4.125 vs 4.1 (0.6%)
    assert full == [0, 1, 5]
    assert rel == pytest.approx([0, 0, 0, 0.1 / 3.6, 0.025 / 4.1, 0.05 / 4.6], abs=1e-6)
    assert ks == [0, 0, 1, 2, 3, 0, 1, 2]
    # a tolerance above the miss forecasts through the bend
    full, _, _ = _drive(dataclasses.replace(plugin, tolerance=0.03), probes)
    assert full == [0, 1]


def test_forecast_error_uses_its_taylor_order():
    # a parabola F(s) = 1 + s^2; full steps 0-2 (values 1, 2, 5)
    probes = [_const(1.0 + s * s) for s in range(6)]
    tol = dict(tolerance=0.15, warmup=3, max_consecutive_skips=10, final_full_steps=0)
    # order 1: the line through steps 1, 2 gives 8 at step 3 (rel 2/10: refresh); then the line
    # through 2, 3 gives 15 at step 4 (2/17: forecast) and 20 at step 5 (6/26: refresh)
    full1, _, rel1 = _drive(ErrorControlledCache(order=1, **tol), probes)
    assert full1 == [0, 1, 2, 3, 5] and rel1 == pytest.approx([0.2, 2 / 17, 6 / 26], rel=1e-5)
    # order 2 (factors 5, 3, 2): 5 + 3k + k^2 gives 9, 15, 23 at k = 1, 2, 3: all within 15%
    full2, _, rel2 = _drive(ErrorControlledCache(order=2, **tol), probes)
    assert full2 == [0, 1, 2] and rel2 == pytest.approx([0.1, 2 / 17, 3 / 26], rel=1e-5)


def test_forecast_error_without_enough_history_refreshes():
    # warm-up 0: step 1 has one observation (order-0 forecast = reuse): error 1/2 > tolerance
    full, _, rel = _drive(ErrorControlledCache(tolerance=0.4, order=1, warmup=0, final_full_steps=0), [_const(1), _const(2)])
    assert full == [0, 1] and rel == pytest.approx([0.5])


def test_defaults_are_the_documented_ones():
    a = AdaptiveBlockCache()
    assert (a.threshold, a.front_blocks, a.back_blocks, a.warmup, a.max_consecutive_skips, a.taylor_order,
            a.final_full_steps, a.check_finite) == (0.08, 1, 0, 4, 3, 0, 0, True)
    e = ErrorControlledCache()
    assert (e.tolerance, e.order, e.probe_blocks, e.warmup, e.max_consecutive_skips, e.final_full_steps,
            e.check_finite) == (0.05, 1, 1, 3, 6, 1, True)
    s = a._settings()
    assert (s.gate, s.threshold, s.front, s.back, s.warmup, s.max_cached, s.order, s.final_full) == (
        "change", 0.08, 1, 0, 4, 3, 0, 0)


# ------------------------------------------------------------------------------------------------
# on real pipelines: the schedule follows the rule, reused steps add the cached residual
# ------------------------------------------------------------------------------------------------


def _record_probe(pipe, unet: bool):
    """Record, per denoiser call, the probe the gate sees (front residual, or the UNet's first down block output)."""
    probes, handles = [], []
    if unet:
        block = pipe.unet.down_blocks[0]
        handles.append(block.register_forward_hook(lambda m, a, out: probes.append((out[0] if isinstance(out, tuple) else out).clone())))
    else:
        den = pipe.transformer
        block = (den.transformer_blocks if hasattr(den, "transformer_blocks") else den.blocks)[0]
        inputs = []

        def pre(m, args, kwargs):
            inputs.append(kwargs.get("hidden_states", args[0] if args else None).clone())

        def post(m, args, kwargs, out):
            h = out[1] if type(m).__name__ == "FluxTransformerBlock" else (out[1] if isinstance(out, tuple) else out)
            probes.append(h - inputs[-1])

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    return probes, handles


def _expected_schedule(probes, gate, threshold, warmup, max_cached, final_full, order=1):
    n, full, consecutive = len(probes), [], 0
    ref, factors = None, TaylorFactors(order)
    for step, p in enumerate(probes):
        p64 = p.double()
        allowed = step > 0 and step >= warmup and consecutive < max_cached and n - step > final_full
        reuse = False
        if allowed:
            if gate == "change":
                rel = ((p64 - ref).abs().mean() / ref.abs().mean()).item()
            else:
                rel = ((p64 - factors.forecast(step)).abs().mean() / p64.abs().mean()).item()
            reuse = rel < threshold
        if reuse:
            consecutive += 1
        else:
            consecutive, ref = 0, p64
            factors.update(p64, step)
            full.append(step)
    return full


@pytest.mark.parametrize(
    "family, make, plugin",
    [
        ("flux", make_flux, AdaptiveBlockCache(threshold=0.28, warmup=2, max_consecutive_skips=2)),
        ("flux", make_flux, ErrorControlledCache(tolerance=0.4, warmup=2, max_consecutive_skips=3)),
        ("sd3", make_sd3, AdaptiveBlockCache(threshold=0.3, warmup=1, final_full_steps=1)),
        ("sd", make_sd, AdaptiveBlockCache(threshold=0.2, warmup=2, max_consecutive_skips=2)),
        ("sd", make_sd, ErrorControlledCache(tolerance=0.02, warmup=3, final_full_steps=2)),
    ],
    ids=lambda v: v if isinstance(v, str) else (type(v).__name__ if not callable(v) else ""),
)
def test_schedule_follows_the_rule_on_the_recorded_probes(family, make, plugin):
    pipe = make()
    probes, handles = _record_probe(pipe, unet=family == "sd")
    try:
        with diffboost.accelerated(pipe, plugin):
            run(pipe, family, num_inference_steps=14)
            branch = next(iter(diffboost.describe(pipe)["last_call"][0]["branches"].values()))
    finally:
        for h in handles:
            h.remove()
    ecc = isinstance(plugin, ErrorControlledCache)
    expected = _expected_schedule(
        probes,
        "forecast_error" if ecc else "change",
        plugin.tolerance if ecc else plugin.threshold,
        plugin.warmup,
        plugin.max_consecutive_skips if ecc else plugin.max_consecutive_skips,
        plugin.final_full_steps,
        plugin.order if ecc else 1,
    )
    assert len(probes) == 14 and branch["full_steps"] == expected
    gated_full = [s for s in expected if s >= max(plugin.warmup, 1)]
    # the threshold sits inside the range of this model's changes: both decisions happen
    assert branch["forecast"] > 0 and gated_full, (expected, branch)


def _run_hooked(pipe, family: str, order: int, handles: list, **call) -> dict:
    """8 steps under AdaptiveBlockCache(threshold=10, warmup=2, max_consecutive_skips=2, back_blocks=1):
    full steps 0, 1, 4, 7. Takes the recording hooks off afterwards; returns the per-branch counts."""
    plugin = AdaptiveBlockCache(threshold=10, warmup=2, max_consecutive_skips=2, back_blocks=1, taylor_order=order)
    try:
        with diffboost.accelerated(pipe, plugin):
            run(pipe, family, num_inference_steps=8, **call)
            return diffboost.describe(pipe)["last_call"][0]["branches"]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("order", [0, 1])
def test_reused_steps_add_the_cached_middle_residual(order):
    pipe = make_flux()
    den = pipe.transformer
    first_mid, last_mid, back = den.transformer_blocks[1], den.single_transformer_blocks[0], den.single_transformer_blocks[1]
    mid_in, mid_out, back_runs, mid_runs = [], [], [], []
    handles = [
        first_mid.register_forward_pre_hook(lambda m, a, kw: mid_in.append(kw["hidden_states"].clone()), with_kwargs=True),
        last_mid.register_forward_hook(lambda m, a, kw, out: mid_out.append(out[1].clone()), with_kwargs=True),
        back.attn.register_forward_pre_hook(lambda m, a: back_runs.append(1)),
        first_mid.attn.register_forward_pre_hook(lambda m, a: mid_runs.append(1)),
    ]
    branch = _run_hooked(pipe, "flux", order, handles)["cond"]
    full = [0, 1, 4, 7]
    assert branch["full_steps"] == full
    assert len(back_runs) == 8 and len(mid_runs) == len(full)  # back blocks always run, middle ones only when full
    # the middle residual of the image stream (Flux's single blocks carry text + image tokens together:
    # the image tokens are the tail of the sequence)
    res = [o[:, -i.shape[1]:] - i for i, o in zip(mid_in, mid_out)]
    factors = TaylorFactors(order)
    for step in range(8):
        if step in full:
            factors.update(res[step], step)
        else:
            expected = factors.forecast(step) if order else factors.latest()
            torch.testing.assert_close(res[step], expected, rtol=1e-5, atol=1e-5)
    if order:
        assert not torch.allclose(res[2], res[3], atol=1e-4)  # forecast, not reuse


@pytest.mark.parametrize("order", [0, 1])
def test_across_a_text_image_join_the_residual_is_added_to_the_joined_stream(order):
    """Chroma's middle starts at a dual-stream block (image and text apart) and ends at a single-stream
    block on cat([text, image]): the residual is the last block's output minus the first block's
    inputs joined, and a reused step adds it to the joined stream the last block receives."""
    from factories import make_chroma

    pipe = make_chroma()
    den = pipe.transformer
    first_mid, last_mid = den.transformer_blocks[1], den.single_transformer_blocks[0]
    mid_in, last_in, mid_out = [], [], []
    handles = [
        first_mid.register_forward_pre_hook(
            lambda m, a, kw: mid_in.append(torch.cat([kw["encoder_hidden_states"], kw["hidden_states"]], 1)), with_kwargs=True
        ),
        last_mid.register_forward_pre_hook(lambda m, a, kw: last_in.append(kw["hidden_states"].clone()), with_kwargs=True),
        last_mid.register_forward_hook(lambda m, a, kw, out: mid_out.append(out.clone()), with_kwargs=True),
    ]
    branch = _run_hooked(pipe, "chroma", order, handles, guidance_scale=1.0)["default"]  # one pass per step
    full = [0, 1, 4, 7]
    assert branch["full_steps"] == full
    res = [o - i for i, o in zip(mid_in, mid_out)]
    factors = TaylorFactors(order)
    for step in range(8):
        if step in full:
            factors.update(res[step], step)
        else:
            # the middle passed its input through: the last block received the joined first inputs
            torch.testing.assert_close(last_in[step], mid_in[step], rtol=0, atol=0)
            expected = factors.forecast(step) if order else factors.latest()
            torch.testing.assert_close(res[step], expected, rtol=1e-5, atol=1e-5)


def test_joined_input_is_text_then_image_and_anything_else_is_refused():
    from diffboost import UnsupportedPipelineError
    from diffboost.caches.block_cache import joined_input

    h0, e0 = torch.randn(2, 16, 4), torch.randn(2, 8, 4)
    assert torch.equal(joined_input(h0, e0, torch.empty(2, 24, 4), torch.nn.Identity()), torch.cat([e0, h0], 1))
    for h, e in ((torch.empty(2, 20, 4), e0), (torch.empty(2, 24, 4), None), (torch.empty(1, 24, 4), e0),
                 (torch.empty(2, 24, 8), e0)):
        with pytest.raises(UnsupportedPipelineError, match=r"Identity returns .* not the text and image streams joined"):
            joined_input(h0, e, h, torch.nn.Identity())


def test_unet_reused_steps_return_the_cached_deep_features():
    pipe = make_sd()
    unet = pipe.unet
    mid_out, deep_runs, front_runs = [], [], []
    handles = [
        unet.up_blocks[0].register_forward_hook(lambda m, a, out: mid_out.append(out)),
        unet.mid_block.resnets[0].register_forward_pre_hook(lambda m, a: deep_runs.append(1)),
        unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: front_runs.append(1)),
    ]
    try:
        with diffboost.accelerated(pipe, AdaptiveBlockCache(threshold=10, warmup=2, max_consecutive_skips=1)):
            run(pipe, "sd", num_inference_steps=6)
            branch = diffboost.describe(pipe)["last_call"][0]["branches"]["default"]
    finally:
        for h in handles:
            h.remove()
    assert branch["full_steps"] == [0, 1, 3, 5]
    assert len(front_runs) == 6 and len(deep_runs) == 4


def test_reused_steps_add_the_cached_text_stream_residual_too():
    pipe = make_flux()
    den = pipe.transformer
    first_mid, last_mid = den.transformer_blocks[1], den.single_transformer_blocks[0]
    enc_in, enc_out = [], []
    handles = [
        first_mid.register_forward_pre_hook(lambda m, a, kw: enc_in.append(kw["encoder_hidden_states"].clone()), with_kwargs=True),
        last_mid.register_forward_hook(lambda m, a, kw, out: enc_out.append(out[0].clone()), with_kwargs=True),
    ]
    try:
        with diffboost.accelerated(pipe, AdaptiveBlockCache(threshold=10, warmup=2, max_consecutive_skips=2, back_blocks=1)):
            run(pipe, "flux", num_inference_steps=6)
    finally:
        for h in handles:
            h.remove()
    res = [o - i for i, o in zip(enc_in, enc_out)]
    # full steps 0, 1, 4; reused steps 2, 3, 5 add the text-stream residual of the last full step
    for step, ref in ((2, 1), (3, 1), (5, 4)):
        torch.testing.assert_close(res[step], res[ref], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(res[1], res[4], atol=1e-4)


@pytest.mark.parametrize("cls, kwargs", [(AdaptiveBlockCache, dict(threshold=10)), (ErrorControlledCache, dict(tolerance=10, final_full_steps=0))])
def test_nan_on_a_reused_step_falls_back_and_is_reported_once(cls, kwargs, caplog, monkeypatch):
    import logging

    pipe = make_flux()
    base = run(pipe, "flux", num_inference_steps=5)
    latest, forecast = TaylorFactors.latest, TaylorFactors.forecast

    def poison(value):  # only the middle residual (a tuple); the probe's own forecast stays as it is
        return tuple(v * float("nan") if v is not None else v for v in value) if isinstance(value, tuple) else value

    monkeypatch.setattr(TaylorFactors, "latest", lambda self: poison(latest(self)))
    monkeypatch.setattr(TaylorFactors, "forecast", lambda self, step: poison(forecast(self, step)))
    plugin = cls(warmup=1, **kwargs)
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "flux", num_inference_steps=5)
            branch = diffboost.describe(pipe)["last_call"][0]["branches"]["cond"]
    # every reuse was poisoned and recomputed: the result is the plain pipeline's
    assert torch.equal(out, base)
    assert branch["full_steps"] == [0, 1, 2, 3, 4] and branch["nan_fallbacks"] == 4
    warnings = [r.message for r in caplog.records if "NaN/Inf" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith(cls.__name__)
    # without the check the NaN goes through
    with diffboost.accelerated(pipe, cls(warmup=1, check_finite=False, **kwargs)):
        assert torch.isnan(run(pipe, "flux", num_inference_steps=5)).any()
        assert diffboost.describe(pipe)["last_call"][0]["branches"]["cond"]["nan_fallbacks"] == 0


def test_blocks_left_for_the_middle_and_the_roles_in_describe():
    pipe = make_flux()  # 4 cacheable blocks
    for front, back in ((2, 2), (3, 1), (1, 3), (4, 0)):
        with pytest.raises(ValueError, match=rf"front/probe blocks \({front}\) \+ back blocks \({back}\) must leave at least one middle block, but FluxTransformer2DModel has 4 cacheable blocks"):
            diffboost.apply(pipe, AdaptiveBlockCache(front_blocks=front, back_blocks=back))
        assert not hasattr(pipe.transformer.transformer_blocks[0], "_diffusers_hook")
    with pytest.raises(ValueError, match=r"ErrorControlledCache: front/probe blocks \(4\)"):
        diffboost.apply(pipe, ErrorControlledCache(probe_blocks=4))
    plugin = AdaptiveBlockCache(front_blocks=2, back_blocks=1)
    with diffboost.accelerated(pipe, plugin):
        assert pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("diffboost.block_cache") is not None
        run(pipe, "flux", num_inference_steps=2)
        stats = diffboost.describe(pipe)["last_call"][0]
    assert stats["plugin"] == repr(plugin)
    assert stats["modules"] == {
        "computed every step (front)": ["transformer_blocks.0", "transformer_blocks.1"],
        "reused on cached steps (middle)": ["single_transformer_blocks.0"],
        "computed every step (back)": ["single_transformer_blocks.1"],
    }
    with diffboost.accelerated(pipe, ErrorControlledCache(probe_blocks=3)):
        run(pipe, "flux", num_inference_steps=2)
        modules = diffboost.describe(pipe)["last_call"][0]["modules"]
    assert modules["reused on cached steps (middle)"] == ["single_transformer_blocks.1"]
    assert modules["computed every step (back)"] == []


def test_rel_l1_of_identical_zero_tensors_is_infinite_not_nan():
    z = torch.zeros(3)
    assert _rel_l1(z, z, z) == float("inf")


@pytest.mark.parametrize("plugin", [AdaptiveBlockCache(threshold=0.1), ErrorControlledCache(tolerance=0.1)],
                         ids=["abc", "ecc"])
def test_a_refused_second_expert_leaves_both_untouched(plugin):
    """Wan 2.2's second denoiser has blocks of unknown layout: nothing stays hooked on either."""
    from factories import make_wan

    class Weird(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    pipe = make_wan(two_experts=True)
    pipe.transformer_2.blocks = torch.nn.ModuleList([Weird(), Weird(), Weird()])
    with pytest.raises(UnsupportedPipelineError, match="block class Weird"):
        diffboost.apply(pipe, plugin)
    for den in (pipe.transformer, pipe.transformer_2):
        for module in den.modules():
            registry = getattr(module, "_diffusers_hook", None)
            assert (registry is None or not registry.hooks) and "forward" not in vars(module)
    assert not hasattr(pipe, "_diffboost_handle")
