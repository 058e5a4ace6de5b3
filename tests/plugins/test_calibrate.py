"""diffboost.calibrate: the search on a synthetic fidelity curve (exact trial sequences), and the real
thing on a tiny Flux pipeline (the reported PSNR is what the chosen stack gives, the pipeline is left
unpatched), and its refusals before any pipeline call."""

from __future__ import annotations

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
