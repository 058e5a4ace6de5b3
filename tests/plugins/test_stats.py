"""Typed statistics: every plugin's ``call_stats()`` has the common part (denoiser calls reused per CFG
pass, skipped steps) that the CLI, the demo and the bench read without knowing the plugin, and
``describe()``'s summary adds up to the denoiser calls the runtime counted."""

from __future__ import annotations

import pytest
import torch

import diffboost
from diffboost import SADA, BottleneckSampling, CallStats, TaylorSeer, TokenMerging
from factories import FAMILIES, run

STEPS = 8


def _inner_runs(pipe):
    """Counts the denoiser runs that really computed (its output projection ran)."""
    runs: list[int] = []
    den = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    last = den.proj_out if hasattr(den, "proj_out") else den.conv_out
    return runs, last.register_forward_hook(lambda m, a, out: runs.append(1))


@pytest.mark.parametrize("family, plugins, reused, skipped", [
    # lite TaylorSeer forecasts the whole output on steps 2, 4, 6 (interval 2 after the first two)
    ("wan", [TaylorSeer(interval=2, warmup=2, lite=True, final_full_steps=1)],
     [{"cond": 3, "uncond": 3}], (2, 4, 6)),
    ("wan", [SADA(schedule=(3, 5))], [{"cond": 2, "uncond": 2}], (3, 5)),
    ("chroma", [SADA(schedule=(3, 5))], [{"default": 2, "call1": 2}], (3, 5)),
    # stacked: SADA answers its steps before the cache sees them; nothing counts twice
    ("wan", [TaylorSeer(interval=2, warmup=2, lite=True, final_full_steps=1), SADA(schedule=(3, 5))],
     [{"cond": 2, "uncond": 2}, {"cond": 2, "uncond": 2}], None),
    ("sd", [TokenMerging(ratio=0.5, max_downsample=2)], [{}], ()),
    ("flux", [BottleneckSampling()], [{}], ()),
])
def test_the_common_part_adds_up_to_the_calls_the_runtime_counted(family, plugins, reused, skipped):
    pipe = FAMILIES[family]()
    runs, hook = _inner_runs(pipe)
    try:
        with diffboost.accelerated(pipe, *plugins) as handle:
            runs.clear()
            run(pipe, family, num_inference_steps=STEPS)
            stats = diffboost.call_stats(pipe)
            info = diffboost.describe(pipe)
            assert stats == handle.call_stats()
    finally:
        hook.remove()
    assert all(isinstance(s, CallStats) for s in stats)
    assert [s.plugin for s in stats] == [repr(p) for p in handle.plugins]
    assert [dict(s.reused) for s in stats] == reused
    if skipped is not None:
        assert all(s.skipped_steps == skipped for s in stats)
    total = sum(n for per_pass in info["denoiser_calls"].values() for n in per_pass.values())
    summary = info["summary"]
    assert summary == {"denoiser_calls": total, "reused": sum(s.reused_calls for s in stats),
                       "computed": total - sum(s.reused_calls for s in stats)}
    # computed = the denoiser runs that really ran the model, for plugins that skip whole calls
    if family != "sd" and not isinstance(plugins[0], BottleneckSampling):
        assert summary["computed"] == len(runs)
    assert [d["reused_calls"] for d in info["last_call"]] == [s.reused_calls for s in stats]
    assert [d["skipped_steps"] for d in info["last_call"]] == [list(s.skipped_steps) for s in stats]
    assert diffboost.call_stats(pipe) == []  # not accelerated any more


def test_call_stats_is_frozen_data_with_a_dict_form():
    s = CallStats("X()", {"cond": 2, "uncond": 1}, (3, 4), {"own": 1})
    assert s.reused_calls == 3
    assert s.as_dict() == {"own": 1, "plugin": "X()", "reused_calls": 3, "reused_per_pass": {"cond": 2, "uncond": 1},
                           "skipped_steps": [3, 4]}
    with pytest.raises(AttributeError):
        s.plugin = "Y()"  # type: ignore[misc]
    assert CallStats("Z()").as_dict() == {"plugin": "Z()", "reused_calls": 0, "reused_per_pass": {}, "skipped_steps": []}
