"""Public API behaviour: apply/remove/accelerated/describe, presets, errors, state handling."""

import logging

import pytest
import torch

import diffboost
from diffboost import AdaptiveBlockCache, ErrorControlledCache, IncompatiblePluginsError, TaylorSeer
from diffboost.caches.taylor import TaylorFactors
from factories import make_flux, make_sd, run


@pytest.fixture(scope="module")
def flux():
    return make_flux()


def test_presets_apply_and_report(flux):
    base = run(flux, "flux", num_inference_steps=8)
    for name in diffboost.PRESETS:
        handle = diffboost.apply(flux, name)
        out = run(flux, "flux", num_inference_steps=8)
        info = diffboost.describe(flux)
        handle.remove()
        assert info["accelerated"] and info["family"] == "flux" and info["calls"] == 1
        assert out.shape == base.shape and torch.isfinite(out).all()
    assert diffboost.describe(flux) == {"pipeline": "FluxPipeline", "accelerated": False}


def test_unknown_preset_and_bad_arguments(flux):
    with pytest.raises(ValueError, match="unknown preset 'ludicrous'.*fast"):
        diffboost.apply(flux, "ludicrous")
    with pytest.raises(TypeError, match="plugin configs"):
        diffboost.apply(flux, 42)
    with pytest.raises(ValueError, match="at least one plugin"):
        diffboost.apply(flux)


def test_unsupported_pipeline_names_class_and_families():
    class NotAPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(diffboost.UnsupportedPipelineError, match="NotAPipeline.*supported families: flux, sd3"):
        diffboost.apply(NotAPipeline(), "fast")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: TaylorSeer(interval=0), "TaylorSeer.interval=0 is out of range; allowed: >= 1"),
        (lambda: TaylorSeer(order=5), "TaylorSeer.order=5 is out of range; allowed: >= 0 and <= 4"),
        (lambda: AdaptiveBlockCache(threshold=-0.1), "AdaptiveBlockCache.threshold=-0.1"),
        (lambda: AdaptiveBlockCache(max_consecutive_skips=0), "AdaptiveBlockCache.max_consecutive_skips=0"),
        (lambda: ErrorControlledCache(tolerance=float("nan")), "ErrorControlledCache.tolerance must be finite"),
    ],
)
def test_invalid_hyperparameters_name_the_field(make, field):
    with pytest.raises(ValueError) as err:
        make()
    assert field in str(err.value)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="TaylorSeer.interval must be an int"):
        TaylorSeer(interval=2.5)
    with pytest.raises(TypeError, match="AdaptiveBlockCache.threshold must be a number"):
        AdaptiveBlockCache(threshold="0.1")


def test_incompatible_stack_and_double_apply(flux):
    with pytest.raises(IncompatiblePluginsError, match="TaylorSeer and AdaptiveBlockCache are both cache plugins"):
        diffboost.apply(flux, TaylorSeer(), AdaptiveBlockCache())
    diffboost.apply(flux, TaylorSeer())
    try:
        with pytest.raises(ValueError, match="already accelerated"):
            diffboost.apply(flux, "fast")
    finally:
        diffboost.remove(flux)
    diffboost.remove(flux)  # removing twice is a no-op


def test_too_few_blocks_for_block_cache_is_clear(flux):
    with pytest.raises(ValueError, match="must leave at least one middle block.*has 4 cacheable blocks"):
        diffboost.apply(flux, AdaptiveBlockCache(front_blocks=2, back_blocks=2))
    assert not hasattr(flux, "_diffboost_handle")
    assert "forward" not in vars(flux.transformer)


def test_remove_leaves_modules_clean():
    pipe = make_flux()
    before = {name: sorted(vars(m)) for name, m in pipe.transformer.named_modules()}
    sched_before = sorted(vars(pipe.scheduler))
    for plugin in (TaylorSeer(), AdaptiveBlockCache(), ErrorControlledCache(), TaylorSeer(lite=True)):
        diffboost.apply(pipe, plugin)
        diffboost.remove(pipe)
        assert {name: sorted(vars(m)) for name, m in pipe.transformer.named_modules()} == before
        assert sorted(vars(pipe.scheduler)) == sched_before


def test_two_patched_pipelines_in_one_process_keep_separate_state():
    a, b = make_flux(seed=0), make_flux(seed=1)
    base_a, base_b = run(a, "flux", num_inference_steps=6), run(b, "flux", num_inference_steps=6)
    plugin = TaylorSeer(interval=2, warmup=1)
    diffboost.apply(a, plugin)
    diffboost.apply(b, plugin)
    try:
        alone_a = run(a, "flux", num_inference_steps=6)
        alone_b = run(b, "flux", num_inference_steps=6)
        # interleave calls: neither may disturb the other
        again_a = run(a, "flux", num_inference_steps=6)
        run(b, "flux", num_inference_steps=3)
        again_a2 = run(a, "flux", num_inference_steps=6)
    finally:
        diffboost.remove(a)
        diffboost.remove(b)
    assert torch.equal(alone_a, again_a) and torch.equal(alone_a, again_a2)
    assert not torch.equal(alone_a, base_a) and not torch.equal(alone_b, base_b)


def test_cfg_branches_keep_separate_state(flux):
    """Flux true CFG runs cond and uncond under cache_context: each branch gets its own state."""
    kwargs = dict(num_inference_steps=6, true_cfg_scale=3.0, negative_prompt="a blue square")
    with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1)):
        run(flux, "flux", **kwargs)
        stats = diffboost.describe(flux)["last_call"][0]["branches"]
        no_cfg = run(flux, "flux", num_inference_steps=6)
        stats_no_cfg = diffboost.describe(flux)["last_call"][0]["branches"]
    assert set(stats) == {"cond", "uncond"}
    assert stats["cond"]["full_steps"] == stats["uncond"]["full_steps"] == [0, 2, 4]
    assert set(stats_no_cfg) == {"cond"}
    assert torch.isfinite(no_cfg).all()


def test_resolution_change_between_calls(flux):
    with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1)):
        small = run(flux, "flux", num_inference_steps=4)
        large = run(flux, "flux", num_inference_steps=4, height=96, width=96)
        small2 = run(flux, "flux", num_inference_steps=4)
    assert large.shape[-1] != small.shape[-1] or large.shape[-2] != small.shape[-2]
    assert torch.equal(small, small2)


def test_taylorseer_schedule(flux):
    with diffboost.accelerated(flux, TaylorSeer(interval=3, warmup=2, final_full_steps=1)):
        run(flux, "flux", num_inference_steps=10)
        branch = diffboost.describe(flux)["last_call"][0]["branches"]["cond"]
    assert branch["full_steps"] == [0, 1, 4, 7, 9]


def test_scheduler_swapped_after_apply_is_followed():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = make_flux()
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=1)):
        run(pipe, "flux", num_inference_steps=6)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        first = run(pipe, "flux", num_inference_steps=6)
        second = run(pipe, "flux", num_inference_steps=6)
    assert torch.equal(first, second)
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_nan_forecast_falls_back_to_full_step_and_warns_once(flux, caplog, monkeypatch):
    base = run(flux, "flux", num_inference_steps=6)

    def poisoned(self, step):
        out = original(self, step)
        return torch.utils._pytree.tree_map(lambda t: t * float("nan") if isinstance(t, torch.Tensor) else t, out)

    original = TaylorFactors.forecast
    monkeypatch.setattr(TaylorFactors, "forecast", poisoned)
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        with diffboost.accelerated(flux, TaylorSeer(interval=2, warmup=1)):
            out = run(flux, "flux", num_inference_steps=6)
            branch = diffboost.describe(flux)["last_call"][0]["branches"]["cond"]
    assert torch.equal(out, base), "every forecast was poisoned, so every step must have been recomputed"
    # step 0 is full; every later step is planned as a forecast, poisoned, and recomputed
    assert branch["nan_fallbacks"] == 5 and branch["full_steps"] == list(range(6))
    assert sum("NaN/Inf" in r.message for r in caplog.records) == 1


def test_bf16_pipeline_works_and_never_skip_is_exact():
    pipe = make_flux().to(torch.bfloat16)
    base = run(pipe, "flux", num_inference_steps=6)
    with diffboost.accelerated(pipe, TaylorSeer(interval=1)):
        assert torch.equal(run(pipe, "flux", num_inference_steps=6), base)
    for plugin in (TaylorSeer(interval=3, warmup=1, order=2), AdaptiveBlockCache(threshold=10, warmup=1, taylor_order=1)):
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "flux", num_inference_steps=6)
        assert out.dtype == base.dtype and torch.isfinite(out.float()).all() and not torch.equal(out, base)


def test_unet_block_cache_keeps_skip_connections_live():
    pipe = make_sd()
    base = run(pipe, "sd", num_inference_steps=8)
    with diffboost.accelerated(pipe, AdaptiveBlockCache(threshold=10, warmup=2, max_consecutive_skips=1)):
        out = run(pipe, "sd", num_inference_steps=8)
        branch = diffboost.describe(pipe)["last_call"][0]["branches"]["default"]
    assert branch["full_steps"] == [0, 1, 3, 5, 7]
    err = (out - base).abs().mean() / base.abs().mean()
    assert 0 < err < 0.5


def test_model_cpu_offload():
    """accelerate's offload hooks wrap the same forward as ours: both must keep working, in both orders."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = make_flux()
    pipe.enable_model_cpu_offload(device=device)
    base = run(pipe, "flux", num_inference_steps=6)
    with diffboost.accelerated(pipe, TaylorSeer(interval=1)):
        assert torch.equal(run(pipe, "flux", num_inference_steps=6), base)
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=1)):
        outs, forecasts = [], []
        for _ in range(2):  # diffusers re-applies the offload hooks after every call
            outs.append(run(pipe, "flux", num_inference_steps=6))
            forecasts.append(diffboost.describe(pipe)["last_call"][0]["branches"]["cond"]["forecast"])
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1]) and forecasts == [3, 3]
    assert torch.equal(run(pipe, "flux", num_inference_steps=6), base)
    assert hasattr(pipe.transformer, "_hf_hook") and "forward" in vars(pipe.transformer)
    # offload enabled after apply works too
    pipe2 = make_flux()
    with diffboost.accelerated(pipe2, TaylorSeer(interval=2, warmup=1)):
        pipe2.enable_model_cpu_offload(device=device)
        a = run(pipe2, "flux", num_inference_steps=6)
        b = run(pipe2, "flux", num_inference_steps=6)
        assert diffboost.describe(pipe2)["last_call"][0]["branches"]["cond"]["forecast"] == 3
    assert torch.equal(a, b)
    assert torch.equal(run(pipe2, "flux", num_inference_steps=6), base)


def test_describe_lists_module_roles(flux):
    with diffboost.accelerated(flux, AdaptiveBlockCache(back_blocks=1)):
        run(flux, "flux", num_inference_steps=4)
        modules = diffboost.describe(flux)["last_call"][0]["modules"]
    assert modules == {
        "computed every step (front)": ["transformer_blocks.0"],
        "reused on cached steps (middle)": ["transformer_blocks.1", "single_transformer_blocks.0"],
        "computed every step (back)": ["single_transformer_blocks.1"],
    }
    with diffboost.accelerated(flux, TaylorSeer()):
        run(flux, "flux", num_inference_steps=4)
        modules = diffboost.describe(flux)["last_call"][0]["modules"]
    assert "transformer_blocks.0.attn" in modules["forecast"] and "transformer_blocks.0.ff_context" in modules["forecast"]
    assert "single_transformer_blocks.1.proj_out" in modules["forecast"]
    assert "single_transformer_blocks.1.proj_mlp" in modules["skipped (output unused on forecast steps)"]


def test_wan_two_experts_each_get_their_own_clock():
    from factories import make_wan

    pipe = make_wan(two_experts=True)
    base = run(pipe, "wan", num_inference_steps=8)
    with diffboost.accelerated(pipe, TaylorSeer(interval=1)):
        assert torch.equal(run(pipe, "wan", num_inference_steps=8), base)
    with diffboost.accelerated(pipe, TaylorSeer(interval=2, warmup=1)):
        out = run(pipe, "wan", num_inference_steps=8)
        stats = diffboost.describe(pipe)["last_call"]
    assert [s["denoiser"] for s in stats] == ["transformer", "transformer_2"]
    steps = [s["branches"]["cond"]["steps"] for s in stats]
    assert sum(steps) == 8 and all(n > 0 for n in steps)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_final_full_steps_follow_the_schedule_across_experts():
    """Wan 2.2's low-noise expert joins mid-schedule: its last steps are still the call's last steps."""
    from factories import make_wan

    pipe = make_wan(two_experts=True)
    with diffboost.accelerated(pipe, TaylorSeer(interval=100, warmup=1, final_full_steps=2)):
        run(pipe, "wan", num_inference_steps=8)
        stats = {s["denoiser"]: s["branches"]["cond"] for s in diffboost.describe(pipe)["last_call"]}
    low = stats["transformer_2"]
    assert low["full_steps"][-2:] == [low["steps"] - 2, low["steps"] - 1]
    assert stats["transformer"]["full_steps"] == [0]


# ----------------------------------------------------------------------------------------------
# apply / remove / describe with recording plugins (no model surgery: what the API itself does)
# ----------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402

from diffboost.plugins.api import _as_plugins  # noqa: E402
from diffboost.plugins.stacks import PRESET_DIR  # noqa: E402
from diffboost.plugins.base import Installed, Plugin, PluginKind  # noqa: E402
from diffboost.plugins.runtime import CallStarted, StageSwitched  # noqa: E402


class Item(Installed):
    def __init__(self, label, log):
        self.label, self.log = label, log

    def reset(self):
        self.log.append(("reset", self.label))

    def remove(self):
        self.log.append(("remove", self.label))

    def stats(self):
        return {"item": self.label}


@dataclasses.dataclass(frozen=True)
class Rec(Plugin):
    """Installs recording items; optionally fails half-way."""

    label: str = "rec"
    what: PluginKind = PluginKind.CACHE
    log: list = dataclasses.field(default_factory=list, compare=False, repr=False)
    fail: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kind", self.what)

    def install(self, adapter, tracker):
        self.log.append(("install", self.label, adapter.family, tracker.pipe is adapter.pipe))
        if self.fail:
            raise RuntimeError(f"{self.label} cannot install")
        return [Item(self.label + "1", self.log), Item(self.label + "2", self.log)]


def test_as_plugins_flattens_lists_and_presets():
    a, b = TaylorSeer(interval=2), AdaptiveBlockCache()
    assert _as_plugins(("safe", (a,), [[b, "turbo"]], [])) == [
        *diffboost.load(PRESET_DIR / "safe.toml"), a, b, *diffboost.load(PRESET_DIR / "turbo.toml")
    ]
    with pytest.raises(TypeError) as err:
        _as_plugins(([a, 42],))
    assert str(err.value) == (
        "diffboost.apply takes plugin configs (e.g. diffboost.TaylorSeer()) or preset names, got int: 42"
    )


def test_apply_installs_in_stack_order_and_remove_undoes_in_reverse(flux):
    log = []
    outer, inner = Rec("cache", PluginKind.CACHE, log), Rec("tokens", PluginKind.TOKENS, log)
    handle = diffboost.apply(flux, [outer], inner)
    try:
        assert flux._diffboost_handle is handle and handle.plugins == [inner, outer]
        assert log == [("install", "tokens", "flux", True), ("install", "cache", "flux", True)]
        assert [i.label for i in handle.installed] == ["tokens1", "tokens2", "cache1", "cache2"]
        (counter,) = [c for _, c in handle.counters]  # the runtime's call counter, outermost on the denoiser
        assert not hasattr(handle.tracker, "installed")  # plugins do not see each other through it
        assert [len(handle.tracker._handlers[e]) for e in (CallStarted, StageSwitched)] == [2, 1]
        assert repr(handle) == f"Acceleration(FluxPipeline, plugins={[inner, outer]})"
        del log[:]
        run(flux, "flux", num_inference_steps=2)  # every call starts with a reset of everything installed
        assert log == [("reset", "tokens1"), ("reset", "tokens2"), ("reset", "cache1"), ("reset", "cache2")]
    finally:
        del log[:]
        diffboost.remove(flux)
    assert log == [("remove", "cache2"), ("remove", "cache1"), ("remove", "tokens2"), ("remove", "tokens1")]
    assert handle.installed == [] and not hasattr(flux, "_diffboost_handle")
    assert "set_timesteps" not in vars(flux.scheduler) and "step" not in vars(flux.scheduler)
    registry = getattr(flux.transformer, "_diffusers_hook", None)  # the pipeline's cache_context may make one
    assert "forward" not in vars(flux.transformer) and (registry is None or not registry.hooks)
    del log[:]
    handle.remove()  # a second remove finds nothing to undo
    assert log == []


def test_failed_install_takes_off_what_was_installed(flux):
    log = []
    before = {name: sorted(vars(m)) for name, m in flux.transformer.named_modules()}
    with pytest.raises(RuntimeError, match="^step cannot install$"):
        diffboost.apply(flux, Rec("step", PluginKind.STEP, log, fail=True), Rec("cache", PluginKind.CACHE, log))
    assert log == [
        ("install", "cache", "flux", True),
        ("install", "step", "flux", True),
        ("remove", "cache2"),
        ("remove", "cache1"),
    ]
    assert not hasattr(flux, "_diffboost_handle") and "set_timesteps" not in vars(flux.scheduler)
    assert {name: sorted(vars(m)) for name, m in flux.transformer.named_modules()} == before
    # a real cache that installed its hooks before a later plugin failed is taken off too
    with pytest.raises(RuntimeError):
        diffboost.apply(flux, TaylorSeer(), Rec("step", PluginKind.STEP, log, fail=True))
    assert {name: sorted(vars(m)) for name, m in flux.transformer.named_modules()} == before


def test_removing_a_stale_handle_leaves_the_current_one(flux):
    old = diffboost.apply(flux, Rec("a"))
    old.remove()
    new = diffboost.apply(flux, Rec("b"))
    try:
        old.remove()
        assert flux._diffboost_handle is new
    finally:
        diffboost.remove(flux)
    assert not hasattr(flux, "_diffboost_handle")


def test_describe_reports_the_pipeline_the_plugins_and_the_calls(flux):
    plugin = Rec("c")
    with diffboost.accelerated(flux, plugin) as handle:
        assert flux._diffboost_handle is handle
        first = diffboost.describe(flux)
        run(flux, "flux", num_inference_steps=2)
        run(flux, "flux", num_inference_steps=2)
        second = diffboost.describe(flux)
    assert first == {
        "accelerated": True,
        "pipeline": "FluxPipeline",
        "family": "flux",
        "denoisers": {"transformer": "FluxTransformer2DModel (4 blocks)"},
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "flow_matching": True,
        "cfg": "context",
        "plugins": [repr(plugin)],
        "calls": 0,
        "denoiser_calls": {"transformer": {}},
        "summary": {"denoiser_calls": 0, "computed": 0, "reused": 0},
        # a plugin that reports only its own numbers gets the common part of the typed stats empty
        "last_call": [
            {"item": f"c{i}", "plugin": "Item", "reused_calls": 0, "reused_per_pass": {}, "skipped_steps": []}
            for i in (1, 2)
        ],
        "per_stage": [],  # no multi-resolution sampler in the stack
    }
    # the last call's denoiser calls per pass (Flux names its conditional pass "cond")
    assert second == {**first, "calls": 2, "denoiser_calls": {"transformer": {"cond": 2}},
                      "summary": {"denoiser_calls": 2, "computed": 2, "reused": 0}}
    assert diffboost.describe(flux) == {"pipeline": "FluxPipeline", "accelerated": False}


def test_accelerated_removes_on_error(flux):
    log = []
    with pytest.raises(KeyError):
        with diffboost.accelerated(flux, Rec("c", log=log)):
            raise KeyError("boom")
    assert log[-2:] == [("remove", "c2"), ("remove", "c1")] and not hasattr(flux, "_diffboost_handle")


def test_scheduler_swapped_between_calls_starts_a_fresh_call():
    """Regression: a swapped scheduler's set_timesteps runs before diffboost can wrap it. The call used
    to keep the previous call's step count (final steps wrong) and, on a UNet (not reset by diffusers at
    the end of a call), continue the previous call's step counter and stored features."""
    from diffusers import DDIMScheduler

    pipe = make_sd()
    with diffboost.accelerated(pipe, TaylorSeer(interval=100, warmup=1, final_full_steps=2)):
        run(pipe, "sd", num_inference_steps=2)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        first = run(pipe, "sd", num_inference_steps=4)
        info = diffboost.describe(pipe)
        second = run(pipe, "sd", num_inference_steps=4)
    assert info["calls"] == 2
    assert info["last_call"][0]["branches"]["default"]["full_steps"] == [0, 2, 3]
    assert torch.equal(first, second)


@pytest.mark.parametrize("plugin", [TaylorSeer(interval=2, warmup=2, final_full_steps=0),
                                    AdaptiveBlockCache(threshold=10.0, warmup=2),
                                    diffboost.SADA(acc_range=(3, 8), criterion="curvature", tolerance=10.0)],
                         ids=["taylorseer", "block_cache", "sada"])
def test_a_call_sends_its_events_in_order_and_skip_decisions_match_the_statistics(plugin):
    """CallStarted, then per step StepStarted, the plugin's SkipDecided per denoiser call, StepEnded;
    the decisions heard are the ones the statistics report, on Flux with true CFG (two passes)."""
    from diffboost.events import EVENTS, CallStarted, SkipDecided, StepEnded, StepStarted

    flux = make_flux()
    handle = diffboost.apply(flux, plugin)
    heard: list = []
    for event_type in EVENTS:
        handle.subscribe(event_type, heard.append)
    with pytest.raises(TypeError, match="unknown event type"):
        handle.subscribe(int, heard.append)
    steps = 8
    for _ in range(2):  # the second call hears the same sequence
        heard.clear()
        run(flux, "flux", num_inference_steps=steps, true_cfg_scale=2.0, negative_prompt="x")
        assert heard[0] == CallStarted(handle.tracker.calls, steps)
        kinds = [type(e).__name__ for e in heard[1:]]
        per_step = ["StepStarted"] + ["SkipDecided"] * 2 + ["StepEnded"]
        assert kinds == per_step * steps
        assert [e.step for e in heard if isinstance(e, StepStarted)] == list(range(steps))
        assert sum(isinstance(e, StepEnded) for e in heard) == steps
        decided = [e for e in heard if isinstance(e, SkipDecided)]
        assert {e.plugin for e in decided} == {plugin.name} and {e.branch for e in decided} == {"cond", "uncond"}
        stats = handle.call_stats()[0]
        for branch in ("cond", "uncond"):
            mine = [e for e in decided if e.branch == branch]
            assert [e.step for e in mine] == list(range(steps))
            skipped = [e.step for e in mine if not e.computed]
            assert skipped and len(skipped) == stats.reused[branch]
    diffboost.remove(flux)


def test_context_parallel_pipelines_are_refused_with_a_clear_error():
    """diffusers' context parallelism needs an accelerator (it cannot be enabled on this CPU machine),
    so the model is marked as enable_parallelism marks it; the refusal names the reason and the way out."""
    import pytest

    import diffboost
    from diffboost.plugins.stacking import IncompatiblePluginsError
    from factories import make_flux

    pipe = make_flux()
    pipe.transformer._parallel_config = object()
    with pytest.raises(IncompatiblePluginsError, match="context parallelism.*torchrun -m diffboost batch"):
        diffboost.apply(pipe, "fast")
    assert getattr(pipe, "_diffboost_handle", None) is None  # nothing was installed
    pipe.transformer._parallel_config = None
    diffboost.apply(pipe, "fast")
    diffboost.remove(pipe)
