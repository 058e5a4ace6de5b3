"""diffboost/plugins/presets.py: each preset's exact config, and the ladder they form on a pipeline.

The presets are EasyCache at three settings: their schedules adapt to the model at run time, so the
test pins the configs exactly and, on a tiny Flux pipeline, that each one computes fewer denoiser calls
than the one before, keeps its warm-up and final steps, and that remove() restores the pipeline."""

from __future__ import annotations

import pytest
import torch

import diffboost
from diffboost import EasyCache
from diffboost.plugins.presets import PRESETS, resolve
from factories import make_flux, run


def test_preset_configs():
    assert list(PRESETS) == ["safe", "fast", "turbo"] and diffboost.PRESETS is PRESETS
    assert resolve("safe") == [EasyCache(threshold=0.04, order=1, max_consecutive_skips=4)]
    assert resolve("fast") == [EasyCache(threshold=0.1, order=0, max_consecutive_skips=8)]
    assert resolve("turbo") == [EasyCache(threshold=0.4, order=0, max_consecutive_skips=8)]
    assert resolve("fast") is not resolve("fast")  # a fresh list each time


def test_unknown_preset():
    with pytest.raises(ValueError) as err:
        resolve("ludicrous")
    assert str(err.value) == "unknown preset 'ludicrous'; available presets: ['fast', 'safe', 'turbo']"
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.fixture(scope="module")
def flux():
    return make_flux()


def test_the_presets_form_a_ladder_and_remove_restores(flux):
    base = run(flux, "flux", num_inference_steps=28)
    computed = {}
    for name in PRESETS:
        with diffboost.accelerated(flux, name):
            out = run(flux, "flux", num_inference_steps=28)
            info = diffboost.describe(flux)
        assert info["plugins"] == [repr(p) for p in resolve(name)]
        branch = info["last_call"][0]["branches"]["cond"]
        assert branch["full_steps"][:4] == [0, 1, 2, 3] and branch["full_steps"][-1] == 27, name
        assert torch.isfinite(out).all() and not torch.equal(out, base)
        computed[name] = info["summary"]["computed"]
    assert computed["safe"] > computed["fast"] > computed["turbo"], computed
    assert torch.equal(run(flux, "flux", num_inference_steps=28), base)
