"""EasyCache: the transformation-rate criterion on exact numbers, the whole-output forecast, per-pass
state, refusals; on real pipelines in tests/plugins/test_families.py (every family) and below."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffboost
from diffboost import EasyCache, UnsupportedPipelineError
from diffboost.caches.easycache import CallCacheClock, _change, _parts
from diffboost.plugins.runtime import CallStarted, CallTracker, HookSet, SkipDecided
from factories import make_flux, make_sd, run


class Scheduler:
    def __init__(self):
        self.timesteps = None
        self.step_index = None

    def set_timesteps(self, n):
        self.timesteps = torch.arange(n)


class Pipe:
    def __init__(self):
        self.scheduler = Scheduler()


class Toy(torch.nn.Module):  # noqa: D101
    """forward(hidden_states) = (a * hidden_states + b,) with a, b set per call by the test; counts runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.runs = 1.0, 0.0, 0
        self.aux: torch.Tensor | None = None  # a second output, when set
        self.as_dict = False

    def forward(self, hidden_states, timestep=None):
        self.runs += 1
        if hidden_states is None:
            return (torch.zeros(1),)
        out = self.a * hidden_states + self.b
        if self.as_dict:
            return {"meta": None, "sample": out}
        return (out,) if self.aux is None else (out, self.aux)


def rig(cfg: EasyCache, steps: int):
    pipe = Pipe()
    tracker = CallTracker(pipe)
    toy = Toy()
    clock = CallCacheClock(tracker, cfg, "hidden_states")
    hooks = HookSet("test", toy)
    hooks.add(toy, clock)
    tracker.subscribe(CallStarted, lambda event: hooks.reset())  # what the handle does
    heard: list[SkipDecided] = []
    tracker.subscribe(SkipDecided, heard.append)
    pipe.scheduler.set_timesteps(steps)
    toy.pipe = pipe
    return toy, clock, heard


def test_the_criterion_accumulates_k_times_the_relative_input_change():
    """Inputs x_s = s (all elements), outputs o = 2x: k = 2 exactly; each step adds
    k * |dx| / mean|o_last| = 2 * 1 / (2 * s_last) to E; the step is cached while E < tau."""
    cfg = EasyCache(threshold=0.3, warmup=2, final_full_steps=1, max_consecutive_skips=10, order=0)
    toy, clock, heard = rig(cfg, steps=12)
    toy.a = 2.0
    outs = [toy(torch.full((2, 3), float(s)))[0] for s in range(12)]
    # step 0, 1 warm-up (k = |4 - 2| / |2 - 1| = 2); scale = mean|o_1| = 2
    # step 2: E = 2 * 1 / 2 = 1.0 >= 0.3: full (k = 2, scale 4); step 3: E = 2/4 = 0.5: full (scale 6)
    # step 4: E = 2/6 = 0.333: full (scale 8); step 5: E = 0.25 < 0.3: cached; step 6: E = 0.5: full
    # step 7: 2/12 = 0.167 cached; 8: 0.333 full (scale 16); 9: 0.125 cached; 10: 0.25 cached; 11: last, full
    expected = [True, True, True, True, True, False, True, False, True, False, False, True]
    assert [e.computed for e in heard] == expected
    assert toy.runs == sum(expected)
    # order 0: a cached step returns the last full output as is
    assert torch.equal(outs[5], outs[4]) and torch.equal(outs[10], outs[8])
    assert clock.criteria.get_state().k == pytest.approx(2.0)
    # a second call starts afresh: the same decisions
    first = [e.computed for e in heard]
    heard.clear()
    toy.pipe.scheduler.set_timesteps(12)
    for s in range(12):
        toy(torch.full((2, 3), float(s)))
    assert [e.computed for e in heard] == first


def test_the_threshold_is_strict():
    """Step 5 of the sequence above accumulates E = 2 * 1 / 8 = 0.25 exactly: cached under 0.2500001,
    computed under 0.25."""
    for threshold, cached in ((0.25, False), (0.2500001, True)):
        cfg = EasyCache(threshold=threshold, warmup=2, final_full_steps=1, max_consecutive_skips=10, order=0)
        toy, _, heard = rig(cfg, steps=7)
        toy.a = 2.0
        for s in range(7):
            toy(torch.full((2,), float(s)))
        assert heard[5].computed is not cached


def test_first_order_forecast_is_the_line_through_the_last_two_full_outputs():
    cfg = EasyCache(threshold=0.3, warmup=2, final_full_steps=1, max_consecutive_skips=10, order=1)
    toy, _, heard = rig(cfg, steps=12)
    toy.a = 2.0
    outs = [toy(torch.full((2, 3), float(s)))[0] for s in range(12)]
    assert not heard[5].computed
    # full outputs at steps 3 and 4 are 6 and 8: the forecast for step 5 is 10, the true output
    assert torch.allclose(outs[5], torch.full((2, 3), 10.0))


def test_the_cap_on_cached_steps_in_a_row_and_the_final_steps():
    cfg = EasyCache(threshold=100.0, warmup=2, final_full_steps=2, max_consecutive_skips=2, order=0)
    toy, _, heard = rig(cfg, steps=10)
    for s in range(10):
        toy(torch.full((4,), float(s)))
    assert [e.computed for e in heard] == [True, True, False, False, True, False, False, True, True, True]


def test_a_changed_input_layout_is_computed_in_full():
    cfg = EasyCache(threshold=100.0, warmup=2, final_full_steps=0, order=0)
    toy, _, heard = rig(cfg, steps=4)
    for s, shape in enumerate(((4,), (4,), (5,), (5,))):
        toy(torch.full(shape, float(s)))
    assert [e.computed for e in heard] == [True, True, True, False]


def test_state_is_per_cfg_pass_and_per_call():
    from diffboost.plugins.runtime import set_branch

    cfg = EasyCache(threshold=0.3, warmup=2, final_full_steps=1, max_consecutive_skips=10, order=0)
    toy, _, heard = rig(cfg, steps=12)
    toy.a = 2.0
    for s in range(12):  # the uncond pass sees inputs 10x larger: the same relative changes
        for branch, scale in (("cond", 1.0), ("uncond", 10.0)):
            set_branch(toy, branch)
            toy(torch.full((2,), scale * s))
    set_branch(toy, None)
    for branch in ("cond", "uncond"):
        mine = [e.computed for e in heard if e.branch == branch]
        assert mine == [True, True, True, True, True, False, True, False, True, False, False, True]


def test_helpers():
    a = torch.zeros(3)
    assert _parts(a) == [a] and _parts([a, a]) == [a, a] and _parts("x") is None and _parts([]) is None
    assert _change([torch.ones(2)], [torch.zeros(2)]) == 1.0
    assert _change([torch.ones(2)], None) is None and _change([torch.ones(2)], [torch.ones(3)]) is None


@pytest.mark.parametrize("kwargs, needle", [
    ({"threshold": -0.1}, "EasyCache.threshold=-0.1 is out of range"),
    ({"warmup": 1}, "EasyCache.warmup=1 is out of range"),
    ({"order": 3}, "EasyCache.order=3 is out of range"),
    ({"max_consecutive_skips": 0}, "EasyCache.max_consecutive_skips=0 is out of range"),
    ({"threshold": float("nan")}, "must be finite"),
])
def test_bad_settings_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EasyCache(**kwargs)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        EasyCache(check_finite="yes")


def test_a_denoiser_without_a_latent_first_parameter_is_refused():
    class Odd(torch.nn.Module):
        def forward(self, tokens):
            return tokens

    from diffboost.caches.easycache import _input_name
    from diffboost.plugins.adapters import Denoiser

    with pytest.raises(UnsupportedPipelineError, match="forward starts with 'tokens'"):
        _input_name(Denoiser("transformer", Odd(), [], []))


def test_on_flux_with_true_cfg_and_sd_it_skips_and_remove_restores():
    for make, family, extra in ((make_flux, "flux", {"true_cfg_scale": 2.0, "negative_prompt": "x"}),
                                (make_sd, "sd", {})):
        pipe = make()
        base = run(pipe, family, num_inference_steps=10, **extra)
        with diffboost.accelerated(pipe, EasyCache(threshold=0.5, warmup=2)):
            out = run(pipe, family, num_inference_steps=10, **extra)
            (stats,) = diffboost.call_stats(pipe)
            again = run(pipe, family, num_inference_steps=10, **extra)
        assert stats.reused_calls > 0 and torch.isfinite(out).all() and not torch.equal(out, base)
        assert torch.equal(out, again)  # nothing leaks from one call into the next
        assert torch.equal(run(pipe, family, num_inference_steps=10, **extra), base)


def test_settings_bounds_and_never_skips():
    EasyCache(threshold=1e6, warmup=10_000, final_full_steps=10_000, max_consecutive_skips=10_000, order=2)
    EasyCache(warmup=2, final_full_steps=0, max_consecutive_skips=1, order=0)
    for kwargs in ({"threshold": 1e6 + 1}, {"warmup": 10_001}, {"final_full_steps": 10_001},
                   {"final_full_steps": -1}, {"max_consecutive_skips": 10_001}, {"order": -1}):
        with pytest.raises(ValueError, match="is out of range"):
            EasyCache(**kwargs)
    assert EasyCache(threshold=0.0).never_skips() and not EasyCache(threshold=1e-9).never_skips()


def test_a_non_finite_forecast_is_computed_in_full_and_said_once(caplog):
    cfg = EasyCache(threshold=100.0, warmup=2, final_full_steps=0, max_consecutive_skips=1, order=0)
    toy, clock, heard = rig(cfg, steps=8)
    with caplog.at_level("WARNING", logger="diffboost"):
        for s in range(8):
            # step 1's second output (not the one the criterion reads) is NaN: a reuse of it would be too
            toy.aux = torch.full((1,), float("nan") if s == 1 else 0.0)
            out = toy(torch.full((2,), float(s) + 1))
            if s == 2:
                assert torch.equal(out[1], torch.zeros(1))  # step 2 was to reuse step 1: computed instead
    assert [e.computed for e in heard][:3] == [True, True, True]
    assert clock.stats()["default"]["nan_fallbacks"] >= 1
    assert caplog.text.count("EasyCache: the forecast of step 2 has NaN/Inf") == 1
    # without the check the forecast is returned as it is
    toy, clock, heard = rig(dataclasses.replace(cfg, check_finite=False), steps=4)
    outs = []
    for s in range(4):
        toy.aux = torch.full((1,), float("nan") if s == 1 else 0.0)
        outs.append(toy(torch.full((2,), float(s) + 1))[1])
    assert not heard[2].computed and torch.isnan(outs[2]).all()


def test_decisions_name_the_plugin_and_inputs_it_cannot_read_are_computed():
    cfg = EasyCache(threshold=100.0, warmup=2, final_full_steps=0, order=0)
    toy, clock, heard = rig(cfg, steps=6)
    for s in range(3):
        toy(torch.full((2,), float(s)))
    assert {e.plugin for e in heard} == {"EasyCache"} and not heard[2].computed
    runs = toy.runs
    for s in range(3, 6):
        toy(hidden_states=None)  # no latent to decide on: always computed
    assert toy.runs == runs + 3 and [e.computed for e in heard[3:]] == [True, True, True]


def test_the_rate_is_unknown_until_the_input_moves():
    cfg = EasyCache(threshold=100.0, warmup=2, final_full_steps=0, order=0)
    toy, clock, heard = rig(cfg, steps=5)
    for s in range(5):  # the same input every step: k cannot be measured, so nothing is cached
        toy(torch.ones(2))
    assert all(e.computed for e in heard) and clock.criteria.get_state().k is None
    assert clock.criteria.get_state().scale == 1.0


def test_change_averages_over_the_parts_and_the_first_tensor_output_is_measured():
    assert _change([torch.ones(2), torch.full((3,), 3.0)], [torch.zeros(2), torch.zeros(3)]) == 2.0
    assert _change([torch.ones(2)], [torch.ones(2), torch.ones(2)]) is None and _change([], []) is None
    cfg = EasyCache(threshold=0.3, warmup=2, final_full_steps=1, max_consecutive_skips=10, order=0)
    toy, clock, _ = rig(cfg, steps=3)
    toy.a, toy.as_dict = 3.0, True  # a dict output whose first tensor is the sample
    for s in range(3):
        toy(torch.full((2,), float(s)))
    assert clock.criteria.get_state().k == pytest.approx(3.0)


def test_install_describes_the_whole_denoiser_and_refuses_cleanly():
    pipe = make_flux()
    with diffboost.accelerated(pipe, EasyCache()) as handle:
        (item,) = handle.installed
        assert item.roles == {"cached whole": ["<denoiser>"]} and item.skipped_share == 1.0
        assert len(item.hooks.modules) == 1
    pipe.transformer.forward = lambda tokens, **kw: tokens  # a denoiser without a latent first parameter
    with pytest.raises(UnsupportedPipelineError, match="EasyCache reads the denoiser's latent input"):
        diffboost.apply(pipe, EasyCache())
    del pipe.transformer.forward
    assert not hasattr(pipe, "_diffboost_handle")


def test_an_all_zero_output_gives_no_scale_and_is_never_cached():
    cfg = EasyCache(threshold=100.0, warmup=2, final_full_steps=0, order=0)
    toy, clock, heard = rig(cfg, steps=5)
    toy.a = 0.0
    for s in range(5):
        toy(torch.full((2,), float(s)))
    assert all(e.computed for e in heard) and clock.criteria.get_state().scale == 0.0
