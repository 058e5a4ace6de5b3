"""diffboost.calibrate: the search on a synthetic fidelity curve (exact trial sequences), and the real
thing on a tiny Flux pipeline (the reported PSNR is what the chosen stack gives, the pipeline is left
unpatched), and its refusals before any pipeline call."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

import diffboost
from diffboost import SADA, EasyCache, TaylorSeer, TokenMerging
from diffboost.plugins.calibrate import PRESET_LEVELS, Trial, _between, search
from factories import make_flux

CALL = {"num_inference_steps": 12, "height": 32, "width": 32}
PROMPTS = ["a red circle", "a blue square"]


def curve(edge: float, floor: float | None = None, integer: bool = False):
    """A trial function: holds below ``edge``; the computed share falls with the value until ``floor``."""
    seen: list[float] = []

    def trial(value: float) -> Trial:
        seen.append(value)
        v = value if floor is None else min(value, floor)
        return Trial(value, 60 - v, 1 / (1 + v), value <= edge)

    return trial, seen


def no_check(value: float) -> None:
    return None


def test_search_doubles_then_bisects_to_the_edge():
    trial, seen = curve(edge=0.3)
    best, reached = search(trial, 0.04, False, 20, no_check)
    assert reached
    assert seen[:4] == [0.04, 0.08, 0.16, 0.32]
    assert seen[4] == float(f"{math.sqrt(0.16 * 0.32):.2g}") == 0.23
    assert best.value <= 0.3 and best.held
    # the best is the largest value tried that held, and every larger value tried missed
    assert best.value == max(v for v in seen if v <= 0.3)
    assert 0.28 <= best.value <= 0.3


def test_search_halves_when_the_start_misses():
    trial, seen = curve(edge=0.01)
    best, reached = search(trial, 0.04, False, 20, no_check)
    assert seen[:3] == [0.04, 0.02, 0.01]
    assert reached and best.value == 0.01
    assert seen[3] == 0.014  # then bisects between 0.01 (held) and 0.02 (missed)


def test_search_respects_max_trials():
    trial, seen = curve(edge=1000.0)
    best, reached = search(trial, 0.04, False, 5, no_check)
    assert len(seen) == 5 and reached and best.value == 0.04 * 16


def test_search_stops_going_up_when_the_share_stops_falling():
    trial, seen = curve(edge=1000.0, floor=0.2)
    best, reached = search(trial, 0.05, False, 20, no_check)
    assert seen == [0.05, 0.1, 0.2, 0.4]  # 0.4 computes what 0.2 did: nothing more to gain
    assert best.value == 0.2  # equal shares: the smaller value


def test_search_stops_at_the_fields_range():
    trial, seen = curve(edge=1000.0)

    def check(value: float) -> None:
        if value > 0.5:
            raise ValueError("too large")

    best, reached = search(trial, 0.1, False, 20, check)
    assert seen == [0.1, 0.2, 0.4] and best.value == 0.4


def test_search_reports_when_nothing_holds():
    trial, seen = curve(edge=-1.0)
    best, reached = search(trial, 1.0, False, 30, no_check)
    assert not reached
    assert best.value == min(seen)  # the most faithful tried
    assert min(seen) >= 1.0 / 2**12 and min(seen) < 1.0 / 2**11


def test_search_on_integers():
    trial, seen = curve(edge=11, integer=True)
    best, reached = search(trial, 2.0, True, 20, no_check)
    assert seen[:4] == [2, 4, 8, 16]
    assert reached and best.value == 11
    assert all(float(v).is_integer() for v in seen)


def test_between():
    assert _between(0.02, 0.04, False) == 0.028
    assert _between(4, 9, True) == 6
    assert _between(0.0, 0.5, False) == 0.25


@pytest.fixture(scope="module")
def flux():
    pipe = make_flux()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompts, seed=0):
    out = []
    for p in prompts:
        out.extend(pipe(prompt=p, generator=torch.Generator("cpu").manual_seed(seed), **CALL).images)
    return out


def test_calibrate_on_a_pipeline_reports_what_the_stack_does(flux):
    before = _images(flux, PROMPTS[:1])
    fit = diffboost.calibrate(flux, "fast", prompts=PROMPTS, **CALL)
    assert fit.target_psnr == PRESET_LEVELS["fast"] == 38.0 and fit.field == "threshold" and fit.reached
    assert fit.psnr >= 39.0
    assert isinstance(fit.plugins[0], EasyCache) and fit.plugins[0].threshold == fit.value
    assert fit.plugins[0].order == 0 and fit.plugins[0].max_consecutive_skips == 8  # the preset's other fields
    assert fit.pipeline_calls == len(PROMPTS) * (1 + len(fit.trials))
    assert fit.trials[0].value == 0.1  # starts at the preset's setting
    assert not diffboost.describe(flux)["accelerated"]
    # the pipeline is left as it was
    after = _images(flux, PROMPTS[:1])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))
    # the PSNR reported is the PSNR the chosen stack gives, measured independently
    plain = _images(flux, PROMPTS)
    with diffboost.accelerated(flux, fit.plugins):
        fast = _images(flux, PROMPTS)
    from diffboost.fidelity import psnr

    per_image = psnr(fast, plain, reduction="none")
    pooled = -10 * math.log10(float(torch.pow(10.0, -per_image / 10).mean()))
    assert pooled == pytest.approx(fit.psnr, abs=1e-6)
    # and the chosen value is the strongest that held: every stronger trial missed or saved nothing more
    for t in fit.trials:
        if t.value > fit.value:
            assert not t.held or t.computed_share >= fit.computed_share
    assert fit.computed_share < 1.0
    assert len({t.computed_share for t in fit.trials}) > 1  # the settings tried differ
    assert "threshold=" in fit.summary()


def test_calibrate_an_integer_field(flux):
    fit = diffboost.calibrate(flux, TaylorSeer(interval=2), target_psnr=30, prompts=PROMPTS[:1], max_trials=3, **CALL)
    assert [t.value for t in fit.trials][:2] == [2, 4]
    assert isinstance(fit.value, int) and fit.plugins[0].interval == fit.value


def test_calibrate_warns_when_the_target_is_out_of_reach(flux, caplog):
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        fit = diffboost.calibrate(flux, EasyCache(threshold=1.0, warmup=2, final_full_steps=0), target_psnr=99,
                                  margin_db=0, prompts=PROMPTS[:1], max_trials=3, **CALL)
    assert not fit.reached and "NOT reached" in fit.summary()
    assert [t.value for t in fit.trials] == [1.0, 0.5, 0.25]
    assert fit.value == 0.25 or fit.psnr == max(t.psnr for t in fit.trials)
    assert "no threshold tried kept 99 dB" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"plugins": EasyCache()}, "needs target_psnr"),
    ({"plugins": "fast", "target_psnr": 5}, "target_psnr must be a number of dB in [10, 100]"),
    ({"plugins": "fast", "target_psnr": True}, "target_psnr must be"),
    ({"plugins": "fast", "prompts": []}, "needs prompts"),
    ({"plugins": "fast", "prompts": "a red circle"}, "needs prompts"),
    ({"plugins": "fast", "prompts": ["ok", " "]}, "non-empty strings"),
    ({"plugins": "fast", "seeds": [-1]}, "calibration seed -1 is out of range"),
    ({"plugins": "fast", "seeds": []}, "at least one seed"),
    ({"plugins": "fast", "margin_db": -1}, "margin_db must be"),
    ({"plugins": "fast", "max_trials": 1}, "max_trials must be an integer in [2, 50]"),
    ({"plugins": TokenMerging(), "target_psnr": 40}, "none of them has one"),
    ({"plugins": [EasyCache(), TaylorSeer()], "target_psnr": 40}, "more than one has one"),
    ({"plugins": SADA(), "target_psnr": 40}, "none of them has one"),  # the sign criterion has no knob
    ({"plugins": EasyCache(threshold=0.0), "target_psnr": 40}, "never accelerates"),
    ({"plugins": "nonsense", "target_psnr": 40}, "unknown preset"),
    ({"plugins": "nonsense"}, "needs target_psnr"),
])
def test_calibrate_refuses_bad_input_before_running(kwargs, message):
    class Pipe:  # any call would fail loudly
        def __call__(self, **kw):
            raise AssertionError("no pipeline call expected")

    args = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError) as err:
        diffboost.calibrate(Pipe(), **args)
    assert message in str(err.value)


def test_calibrate_refuses_an_accelerated_pipeline(flux):
    with diffboost.accelerated(flux, EasyCache()):
        with pytest.raises(ValueError, match="already accelerated; call diffboost.remove"):
            diffboost.calibrate(flux, "fast", prompts=PROMPTS)


def test_sada_curvature_is_tunable():
    assert SADA(criterion="curvature").tunable_field() == "tolerance"
    assert SADA().tunable_field() is None
    assert SADA(criterion="curvature", schedule=(3, 4)).tunable_field() is None


def test_search_bisects_to_ten_percent_with_two_digit_values():
    trial, seen = curve(edge=0.3)
    search(trial, 0.04, False, 20, no_check)
    assert seen == [0.04, 0.08, 0.16, 0.32, 0.23, 0.27, 0.29, 0.3]  # 0.32 / 0.3 is within 10%: stop


def test_search_counts_bisection_trials_against_the_limit():
    trial, seen = curve(edge=0.3)
    search(trial, 0.04, False, 6, no_check)
    assert seen == [0.04, 0.08, 0.16, 0.32, 0.23, 0.27]


def test_integer_search_bisects_at_midpoints_and_halves_to_one():
    trial, seen = curve(edge=20, integer=True)
    best, _ = search(trial, 2.0, True, 20, no_check)
    assert seen == [2, 4, 8, 16, 32, 24, 20, 22, 21] and best.value == 20
    trial, seen = curve(edge=0, integer=True)
    best, reached = search(trial, 8.0, True, 20, no_check)
    assert seen == [8, 4, 2, 1] and not reached and best.value == 1
    trial, seen = curve(edge=0, integer=True)
    search(trial, 5.0, True, 20, no_check)
    assert seen == [5, 2, 1]


def test_nothing_held_returns_the_most_faithful_trial():
    def trial(value):
        return Trial(value, {1.0: 30.0, 0.5: 33.0, 0.25: 31.0}[value], 0.5, False)

    best, reached = search(trial, 1.0, False, 3, no_check)
    assert not reached and best.value == 0.5


def test_holds_at_exactly_target_plus_margin():
    from diffboost.plugins.calibrate import _holds

    assert _holds(40.0, 38.0, 2.0) and not _holds(39.999, 38.0, 2.0) and not _holds(38.5, 38.0, 2.0)


def test_summary_text():
    from diffboost.plugins.calibrate import Calibration

    fit = Calibration(plugins=[EasyCache(threshold=0.2)], field="threshold", value=0.2, target_psnr=38.0,
                      margin_db=2.0, psnr=40.25, computed_share=0.375, reached=True,
                      trials=(Trial(0.1, 45.0, 0.5, True), Trial(0.2, 40.25, 0.375, True)), pipeline_calls=6)
    assert fit.summary() == ("EasyCache.threshold=0.2: 40.2 dB (target 38 + 2 dB margin), 38% of the denoiser calls "
                             "computed; tried 0.1: 45.0 dB, 0.2: 40.2 dB")
    other = dataclasses.replace(fit, plugins=[TaylorSeer(interval=3)], field="interval", value=3, psnr=39.0,
                                computed_share=0.5, reached=False)
    both = dataclasses.replace(fit, alternatives=(other, dataclasses.replace(other, reached=True))).summary()
    assert both.startswith("EasyCache.threshold=0.2: 40.2 dB") and both.endswith(
        "; also fitted: TaylorSeer.interval=3, 39.0 dB, 50% computed, target not reached"
        "; also fitted: TaylorSeer.interval=3, 39.0 dB, 50% computed")
    missed = dataclasses.replace(fit, reached=False)
    assert "40.2 dB (target 38 + 2 dB margin) (target NOT reached), 38%" in missed.summary()


def test_defaults_are_documented_values():
    import inspect

    params = inspect.signature(diffboost.calibrate).parameters
    assert params["margin_db"].default == 2.0 and params["max_trials"].default == 8 and params["seeds"].default == (0,)


class Unrunnable:
    """Validation passed when calling it is what fails."""

    def __call__(self, **kw):
        raise AssertionError("reached the pipeline")


@pytest.mark.parametrize("kwargs", [
    {"seeds": 2**63 - 1}, {"seeds": [0, 5]}, {"margin_db": 0}, {"margin_db": 20}, {"max_trials": 2},
    {"max_trials": 50}, {"target_psnr": 10}, {"target_psnr": 100},
])
def test_bounds_are_inclusive(kwargs):
    with pytest.raises(AssertionError, match="reached the pipeline"):
        diffboost.calibrate(Unrunnable(), "fast", prompts=PROMPTS, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": 2**63}, "calibration seed 9223372036854775808 is out of range"),
    ({"seeds": [True]}, "calibration seed True is out of range"),
    ({"margin_db": 20.5}, "margin_db must be"),
    ({"margin_db": True}, "margin_db must be"),
    ({"max_trials": 51}, "max_trials must be"),
    ({"max_trials": True}, "max_trials must be"),
    ({"target_psnr": 9.9}, "target_psnr must be"),
    ({"target_psnr": 100.1}, "target_psnr must be"),
])
def test_just_past_the_bounds_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        diffboost.calibrate(Unrunnable(), "fast", prompts=PROMPTS, **kwargs)


def test_the_refusal_names_the_stack():
    with pytest.raises(ValueError, match=r"in the stack \['EasyCache', 'TaylorSeer'\] more than one"):
        diffboost.calibrate(Unrunnable(), [EasyCache(), TaylorSeer()], target_psnr=40, prompts=PROMPTS)


def test_other_plugins_of_the_stack_are_kept_and_the_share_is_measured(flux):
    from diffboost import QuantizedAttention

    fit = diffboost.calibrate(flux, [EasyCache(threshold=0.4, warmup=2), QuantizedAttention()], target_psnr=20,
                              prompts=PROMPTS, max_trials=2, **CALL)
    assert [type(p).__name__ for p in fit.plugins] == ["EasyCache", "QuantizedAttention"]
    computed = total = 0
    with diffboost.accelerated(flux, fit.plugins) as handle:
        for prompt in PROMPTS:
            flux(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **CALL)
            summary = handle.describe()["summary"]
            computed, total = computed + summary["computed"], total + summary["denoiser_calls"]
    assert 0 < fit.computed_share == computed / total < 1


def test_an_interval_of_one_starts_the_search_at_two(flux):
    fit = diffboost.calibrate(flux, TaylorSeer(interval=1), target_psnr=20, prompts=PROMPTS[:1], max_trials=2, **CALL)
    assert fit.trials[0].value == 2


def test_alternatives_are_fitted_on_the_same_plain_images_and_the_cheapest_wins(flux):
    fit = diffboost.calibrate(flux, EasyCache(threshold=0.05, warmup=2), target_psnr=25, prompts=PROMPTS, max_trials=3,
                              alternatives=[TaylorSeer(interval=2, warmup=1)], **CALL)
    fits = [fit, *fit.alternatives]
    assert sorted(type(f.plugins[0]).__name__ for f in fits) == ["EasyCache", "TaylorSeer"]
    assert fit.reached and fit.computed_share == min(f.computed_share for f in fits if f.reached)
    assert fit.pipeline_calls == len(PROMPTS) * (1 + sum(len(f.trials) for f in fits))
    with pytest.raises(ValueError, match="more than one has one"):
        diffboost.calibrate(Unrunnable(), "fast", prompts=PROMPTS, alternatives=[[EasyCache(), TaylorSeer()]])


def test_a_refused_alternative_is_skipped_and_a_refused_stack_is_an_error(flux, monkeypatch, caplog):
    from diffboost import UnsupportedPipelineError

    def refuse(self, adapter, tracker):
        raise UnsupportedPipelineError("TaylorSeer refused for this test")

    monkeypatch.setattr(TaylorSeer, "install", refuse)
    with caplog.at_level(logging.INFO, logger="diffboost"):
        fit = diffboost.calibrate(flux, EasyCache(threshold=0.05, warmup=2), target_psnr=25, prompts=PROMPTS[:1],
                                  max_trials=2, alternatives=TaylorSeer(interval=2), **CALL)  # one bare config
    assert type(fit.plugins[0]).__name__ == "EasyCache" and fit.alternatives == ()
    assert "skipping the alternative" in caplog.text and "refused for this test" in caplog.text
    with pytest.raises(UnsupportedPipelineError, match="refused for this test"):
        diffboost.calibrate(flux, TaylorSeer(interval=2), target_psnr=25, prompts=PROMPTS[:1], max_trials=2,
                            alternatives=[EasyCache()], **CALL)
    assert not diffboost.describe(flux)["accelerated"]
