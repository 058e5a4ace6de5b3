"""diffboost/plugins/presets.py: each preset's exact config and the exact schedule it runs.

At the 8 steps the API test uses, all three presets compute steps 0-5 and nothing else, so they cannot
be told apart there; at the 28 steps the presets are tuned for they differ from step 8 on."""

from __future__ import annotations

import pytest

import diffboost
from diffboost import TaylorSeer
from diffboost.plugins.presets import PRESETS, resolve
from factories import make_flux, run

WARMUP = list(range(6))
SCHEDULES = {  # full steps at 28 steps; the counts are the ones the presets' docstring promises
    "safe": WARMUP + [8, 11, 14, 17, 20, 23, 26],  # 13 of 28
    "fast": WARMUP + [9, 13, 17, 21, 25],  # 11 of 28
    "turbo": WARMUP + [10, 15, 20, 25],  # 10 of 28
}


def test_preset_configs():
    assert list(PRESETS) == ["safe", "fast", "turbo"] and diffboost.PRESETS is PRESETS
    assert resolve("safe") == [TaylorSeer(interval=3, order=1, warmup=6)]
    assert resolve("fast") == [TaylorSeer(interval=4, order=1, warmup=6)]
    assert resolve("turbo") == [TaylorSeer(interval=5, order=1, warmup=6)]
    assert resolve("fast") is not resolve("fast")  # a fresh list each time


def test_unknown_preset():
    with pytest.raises(ValueError) as err:
        resolve("ludicrous")
    assert str(err.value) == "unknown preset 'ludicrous'; available presets: ['fast', 'safe', 'turbo']"
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.fixture(scope="module")
def flux():
    return make_flux()


def test_each_preset_runs_its_own_schedule(flux):
    assert [len(s) for s in SCHEDULES.values()] == [13, 11, 10]
    for name, full_steps in SCHEDULES.items():
        with diffboost.accelerated(flux, name):
            run(flux, "flux", num_inference_steps=28)
            info = diffboost.describe(flux)
        assert info["plugins"] == [repr(p) for p in resolve(name)]
        branch = info["last_call"][0]["branches"]["cond"]
        assert branch["full_steps"] == full_steps, name
        assert (branch["steps"], branch["full"], branch["forecast"]) == (28, len(full_steps), 28 - len(full_steps))
