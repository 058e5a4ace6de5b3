"""The plugin runtime on its own (diffboost/plugins/runtime.py): StepClock, CallTracker, BranchStates,
InstanceWrap, HookSet. Tiny torch modules, a stub scheduler and stub policies with known answers; no
pipeline."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, _set_cache_context

from diffboost.plugins.runtime import (
    BranchStates,
    CallTracker,
    CallStarted,
    ClockState,
    HookSet,
    InstanceWrap,
    SkipDecided,
    StepClock,
    StepEnded,
    StepPlan,
    StepStarted,
    _all_finite,
    compiled_around,
    invalidate_registry_caches,
)

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# stubs
# ----------------------------------------------------------------------------------------------


class StubScheduler:
    """What CallTracker reads of a scheduler: set_timesteps, timesteps, step_index."""

    def __init__(self):
        self.timesteps = None
        self.step_index = None
        self.seen = []

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        self.seen.append((num_inference_steps, device, sigmas))
        self.timesteps = torch.arange(num_inference_steps)
        return ("set", num_inference_steps)


class StubPipe:
    def __init__(self, scheduler=None):
        if scheduler is not None:
            self.scheduler = scheduler


class Probe(torch.nn.Module):
    """forward(x) = 2x. Records the clock's plan at every run; returns NaN on the steps it is told to."""

    def __init__(self):
        super().__init__()
        self.clock = None
        self.seen: list[tuple] = []
        self.nan_on_forecast: set[int] = set()
        self.nan_on_full: set[int] = set()

    def forward(self, x):
        p = self.clock.plan
        self.seen.append((p.step, p.full, p.k, p.forced, p.steps_left, p.branch))
        if p.step in (self.nan_on_full if p.full else self.nan_on_forecast):
            return x * NAN
        return 2 * x


class Recorder:
    """A policy: full at the given steps; records what it was asked."""

    def __init__(self, full_at=()):
        self.full_at = set(full_at)
        self.asked: list[tuple] = []

    def __call__(self, st: ClockState, step: int, steps_left):
        self.asked.append((step, steps_left, st.step, st.last_full))
        # truthy but not True: StepClock must turn it into a bool
        return "full" if step in self.full_at else []


def every(n):
    return lambda st, step, steps_left: step - st.last_full >= n


def rig(policy, **clock_kwargs):
    pipe = StubPipe(StubScheduler())
    tracker = CallTracker(pipe)
    clock = StepClock(tracker, policy, **clock_kwargs)
    probe = Probe()
    probe.clock = clock
    hooks = HookSet("test", probe)
    hooks.add(probe, clock)
    tracker.subscribe(CallStarted, lambda event: hooks.reset())  # what Acceleration does (through its reset)
    return SimpleNamespace(pipe=pipe, tracker=tracker, clock=clock, probe=probe, hooks=hooks)


X = torch.tensor([1.0, -2.0, 3.0])


def call(r, steps, branches=(None,), step_index=None):
    """One simulated pipeline call: set_timesteps, then one denoiser call per step and branch."""
    r.pipe.scheduler.set_timesteps(steps)
    outs = []
    for i in range(steps):
        if step_index is not None:
            r.pipe.scheduler.step_index = step_index + i
        for b in branches:
            _set_cache_context(r.probe, None if b is None else CacheContext(b))
            outs.append(r.probe(X))
        _set_cache_context(r.probe, None)
    return outs


def stats_of(full_steps, steps, fallbacks=0):
    return {
        "steps": steps,
        "full": len(full_steps),
        "forecast": steps - len(full_steps),
        "full_steps": list(full_steps),
        "nan_fallbacks": fallbacks,
    }


# ----------------------------------------------------------------------------------------------
# plan, clock state
# ----------------------------------------------------------------------------------------------


def test_plan_and_clock_state_defaults():
    assert StepPlan() == StepPlan(step=0, full=True, k=0, branch="default", forced=False, steps_left=None)
    st = ClockState()
    assert (st.step, st.last_full, st.full_steps, st.forecast_steps, st.fallbacks) == (0, -1, [], [], 0)
    st.step, st.last_full, st.fallbacks = 4, 2, 1
    st.full_steps.append(2)
    st.forecast_steps.append(3)
    st.reset()
    assert (st.step, st.last_full, st.full_steps, st.forecast_steps, st.fallbacks) == (0, -1, [], [], 0)


# ----------------------------------------------------------------------------------------------
# StepClock
# ----------------------------------------------------------------------------------------------


def test_policy_is_asked_with_step_and_steps_left_and_first_step_is_always_full():
    policy = Recorder(full_at={0, 3})
    r = rig(policy)
    outs = call(r, 6)
    # step 0 is full without asking (no full step yet); then (step, steps_left, state.step, last_full)
    assert policy.asked == [(1, 5, 1, 0), (2, 4, 2, 0), (3, 3, 3, 0), (4, 2, 4, 3), (5, 1, 5, 3)]
    # (step, full, k, forced, steps_left, branch) as the module saw it
    assert r.probe.seen == [
        (0, True, 0, False, 6, "default"),
        (1, False, 1, False, 5, "default"),
        (2, False, 2, False, 4, "default"),
        (3, True, 0, False, 3, "default"),
        (4, False, 1, False, 2, "default"),
        (5, False, 2, False, 1, "default"),
    ]
    assert all(type(s[1]) is bool for s in r.probe.seen)
    assert all(torch.equal(o, 2 * X) for o in outs)
    st = r.clock.state.states()["default"]
    assert (st.step, st.last_full, st.full_steps, st.forecast_steps) == (6, 3, [0, 3], [1, 2, 4, 5])
    assert r.clock.stats() == {"default": stats_of([0, 3], 6)}


def test_first_step_is_full_even_when_the_policy_says_no():
    r = rig(lambda st, step, left: False)
    call(r, 4)
    assert r.clock.stats() == {"default": stats_of([0], 4)}
    assert [s[2] for s in r.probe.seen] == [0, 1, 2, 3]  # k counts from the one full step


def test_k_counts_steps_since_the_last_full_step():
    r = rig(every(3))
    call(r, 8)
    assert [(s[0], s[1], s[2]) for s in r.probe.seen] == [
        (0, True, 0), (1, False, 1), (2, False, 2), (3, True, 0),
        (4, False, 1), (5, False, 2), (6, True, 0), (7, False, 1),
    ]


def test_steps_left_follows_the_schedulers_step_index():
    """A denoiser that joins mid-schedule (Wan 2.2's second expert): its own step count starts at 0,
    but the scheduler is at step 4 of 10."""
    policy = Recorder()
    r = rig(policy)
    r.pipe.scheduler.set_timesteps(10)
    for i in range(6):
        r.pipe.scheduler.step_index = 4 + i
        r.probe(X)
    assert [(s[0], s[4]) for s in r.probe.seen] == [(0, 6), (1, 5), (2, 4), (3, 3), (4, 2), (5, 1)]
    assert [a[:2] for a in policy.asked] == [(1, 5), (2, 4), (3, 3), (4, 2), (5, 1)]


def test_steps_left_is_unknown_before_set_timesteps():
    policy = Recorder()
    r = rig(policy)
    r.probe(X)
    r.probe(X)
    assert [s[4] for s in r.probe.seen] == [None, None]
    assert policy.asked == [(1, None, 1, 0)]


def test_cfg_branches_have_their_own_clock():
    r = rig(every(2))
    call(r, 5, branches=("cond", "uncond"))
    assert [s[5] for s in r.probe.seen] == ["cond", "uncond"] * 5
    assert [(s[0], s[1]) for s in r.probe.seen[::2]] == [(0, True), (1, False), (2, True), (3, False), (4, True)]
    assert [s[:5] for s in r.probe.seen[::2]] == [s[:5] for s in r.probe.seen[1::2]]
    assert r.clock.stats() == {"cond": stats_of([0, 2, 4], 5), "uncond": stats_of([0, 2, 4], 5)}


def test_nan_forecast_is_recomputed_in_full_and_warned_once_per_pipeline(caplog):
    r = rig(lambda st, step, left: False)
    r.probe.nan_on_forecast = {2, 4}
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        outs = call(r, 6)
        first = r.clock.stats()
        seen_first = list(r.probe.seen)
        r.probe.seen.clear()
        call(r, 6)  # a new call of the same pipeline: no second warning
    assert all(torch.equal(o, 2 * X) for o in outs)
    assert seen_first == [
        (0, True, 0, False, 6, "default"),
        (1, False, 1, False, 5, "default"),
        (2, False, 2, False, 4, "default"),
        (2, True, 0, True, 4, "default"),  # the recompute: full, k=0, forced
        (3, False, 1, False, 3, "default"),  # the fallback counts as the last full step
        (4, False, 2, False, 2, "default"),
        (4, True, 0, True, 2, "default"),
        (5, False, 1, False, 1, "default"),
    ]
    assert first == {"default": stats_of([0, 2, 4], 6, fallbacks=2)}
    assert r.clock.stats() == first  # the second call had the same fallbacks, counted afresh
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "diffboost"]
    assert messages == [
        "diffboost: a forecast step (step 2) produced NaN/Inf; falling back to a full step (reported once per pipeline)"
    ]


def test_nan_warning_names_the_clock():
    r = rig(lambda st, step, left: False, name="TaylorSeer")
    r.probe.nan_on_forecast = {1}
    logger = logging.getLogger("diffboost")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    logger.addHandler(handler)
    try:
        call(r, 3)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("TaylorSeer: a forecast step (step 1) produced NaN/Inf")


def test_nan_check_can_be_turned_off_and_never_touches_full_steps():
    r = rig(lambda st, step, left: False, check_finite=False)
    r.probe.nan_on_forecast = {2}
    outs = call(r, 4)
    assert torch.isnan(outs[2]).all() and torch.equal(outs[3], 2 * X)
    assert r.clock.stats() == {"default": stats_of([0], 4)}
    assert len(r.probe.seen) == 4
    # a full step that produces NaN is returned as is: there is nothing better to fall back to
    r = rig(every(2))
    r.probe.nan_on_full = {2}
    outs = call(r, 4)
    assert torch.isnan(outs[2]).all()
    assert r.clock.stats() == {"default": stats_of([0, 2], 4)}
    assert [s[0] for s in r.probe.seen] == [0, 1, 2, 3]


def test_finite_check_is_on_by_default():
    r = rig(lambda st, step, left: False)
    r.probe.nan_on_forecast = {1}
    outs = call(r, 2)
    assert torch.equal(outs[1], 2 * X)
    assert r.clock.stats()["default"]["nan_fallbacks"] == 1


def test_statistics_survive_the_end_of_call_reset():
    r = rig(every(2))
    call(r, 5)
    done = {"default": stats_of([0, 2, 4], 5)}
    r.hooks.reset()  # what diffusers does at the end of a call
    assert r.clock.plan == StepPlan() and r.clock.state.states() == {}
    assert r.clock.stats() == done
    r.hooks.reset()  # a second reset with nothing run in between keeps them
    assert r.clock.stats() == done
    call(r, 3)  # the next call starts from step 0 and replaces them
    assert r.clock.stats() == {"default": stats_of([0, 2], 3)}
    assert [s[0] for s in r.probe.seen[5:]] == [0, 1, 2]
    assert StepClock(r.tracker, every(1)).stats() == {}


def test_clock_hooks_stay_out_of_compiled_graphs():
    fn = StepClock.new_forward
    assert fn._torchdynamo_disable_recursive is False

    class Hooky:
        def a(self):
            return 1

        def b(self):
            return 2

        def c(self):
            return 3

    plain = Hooky.__dict__["c"]
    assert compiled_around("a", "b")(Hooky) is Hooky
    assert Hooky.a._torchdynamo_disable_recursive is False and Hooky.b._torchdynamo_disable_recursive is False
    assert Hooky.__dict__["c"] is plain and (Hooky().a(), Hooky().b(), Hooky().c()) == (1, 2, 3)
    compiled_around("c", recursive=True)(Hooky)
    assert Hooky.c._torchdynamo_disable_recursive is True and Hooky.c._torchdynamo_orig_callable is plain


def test_all_finite_checks_every_floating_leaf():
    t, bad = torch.ones(2), torch.tensor([1.0, float("inf")])
    assert _all_finite(t) and not _all_finite(bad) and not _all_finite(torch.tensor([NAN]))
    assert _all_finite((t, None)) and not _all_finite((t, bad)) and not _all_finite((bad, t))
    assert _all_finite({"a": t, "b": [t, 3]}) and not _all_finite({"a": t, "b": [t, bad]})
    assert _all_finite(torch.tensor([1, 2])) and _all_finite((torch.tensor([1]), "text"))


# ----------------------------------------------------------------------------------------------
# CallTracker
# ----------------------------------------------------------------------------------------------


def test_set_timesteps_starts_a_call():
    sched = StubScheduler()
    pipe = StubPipe(sched)
    tracker = CallTracker(pipe)
    heard = []
    tracker.subscribe(CallStarted, lambda event: heard.append(("a", event.call, event.num_steps)))
    tracker.subscribe(CallStarted, lambda event: heard.append("b"))
    assert (tracker.calls, tracker.num_steps, tracker.scheduler) == (0, None, sched)
    assert sched.set_timesteps(7, device="cpu", sigmas=[1.0]) == ("set", 7)
    assert sched.seen == [(7, "cpu", [1.0])]
    assert (tracker.calls, tracker.num_steps, heard) == (1, 7, [("a", 1, 7), "b"])
    sched.set_timesteps(num_inference_steps=3)
    assert (tracker.calls, tracker.num_steps, heard[2:]) == (2, 3, [("a", 2, 3), "b"])
    # pipelines inspect set_timesteps for sigmas= support: the wrapper keeps the signature
    assert "set_timesteps" in vars(sched)
    assert inspect.signature(sched.set_timesteps) == inspect.signature(StubScheduler().set_timesteps)
    assert sched.set_timesteps.__name__ == "set_timesteps"


def test_scheduler_without_timesteps_gives_unknown_step_count():
    sched = StubScheduler()
    sched.set_timesteps = lambda n: None  # instance-level, timesteps stays None
    tracker = CallTracker(StubPipe(sched))
    sched.set_timesteps(5)
    assert (tracker.calls, tracker.num_steps, tracker.steps_left(0)) == (1, None, None)


def test_steps_left():
    sched = StubScheduler()
    tracker = CallTracker(StubPipe(sched))
    assert tracker.steps_left(3) is None
    sched.set_timesteps(10)
    assert [tracker.steps_left(i) for i in (0, 3, 9)] == [10, 7, 1]
    sched.step_index = 8
    assert tracker.steps_left(3) == 2
    sched.step_index = 0
    assert tracker.steps_left(3) == 10
    sched.step_index = 2.0  # not an int: the branch's own count
    assert tracker.steps_left(3) == 7


def test_pipelines_without_a_usable_scheduler():
    tracker = CallTracker(StubPipe())
    assert tracker.scheduler is None and tracker.steps_left(0) is None
    tracker.ensure_current()
    assert tracker.calls == 0
    odd = SimpleNamespace(timesteps=torch.arange(4))  # no set_timesteps: nothing to wrap
    tracker = CallTracker(StubPipe(odd))
    assert "set_timesteps" not in vars(odd) and tracker.scheduler is odd
    tracker.ensure_current()
    tracker.ensure_current()
    assert tracker.calls == 0  # not mistaken for a scheduler swap at every step


def test_swapped_scheduler_is_followed_and_starts_the_call():
    old, new = StubScheduler(), StubScheduler()
    pipe = StubPipe(old)
    tracker = CallTracker(pipe)
    heard = []
    tracker.subscribe(CallStarted, lambda event: heard.append(event.num_steps))
    old.set_timesteps(6)
    pipe.scheduler = new
    new.set_timesteps(9)  # runs before the tracker can know: the pipeline call has begun unseen
    assert (tracker.calls, tracker.num_steps) == (1, 6)
    tracker.ensure_current()  # the first denoiser call of the new call
    assert "set_timesteps" not in vars(old) and "set_timesteps" in vars(new)
    assert (tracker.scheduler, tracker.calls, tracker.num_steps, heard) == (new, 2, 9, [6, 9])
    tracker.ensure_current()  # later denoiser calls of the same call change nothing
    assert (tracker.calls, heard) == (2, [6, 9])
    new.set_timesteps(4)
    assert (tracker.calls, tracker.num_steps, heard) == (3, 4, [6, 9, 4])
    old.set_timesteps(2)  # the old scheduler is no longer followed
    assert tracker.calls == 3


def test_swap_resets_the_clock_and_keeps_the_branch():
    """A swap noticed inside the pipeline's cache_context: the new call starts at step 0 in the same
    branch, with the new step count."""
    r = rig(every(2))
    call(r, 6, branches=("cond",))
    new = StubScheduler()
    r.pipe.scheduler = new
    new.set_timesteps(4)
    r.probe.seen.clear()
    for _ in range(4):
        _set_cache_context(r.probe, CacheContext("cond"))
        r.probe(X)
    _set_cache_context(r.probe, None)
    assert r.probe.seen == [
        (0, True, 0, False, 4, "cond"),
        (1, False, 1, False, 3, "cond"),
        (2, True, 0, False, 2, "cond"),
        (3, False, 1, False, 1, "cond"),
    ]
    assert r.clock.stats() == {"cond": stats_of([0, 2], 4)}


def test_remove_unwraps_and_forgets_listeners():
    sched = StubScheduler()
    tracker = CallTracker(StubPipe(sched))
    tracker.subscribe(CallStarted, lambda event: None)
    assert tracker.listens(CallStarted) and not tracker.listens(StepEnded)
    tracker.remove()
    assert "set_timesteps" not in vars(sched) and not tracker.listens(CallStarted) and tracker.scheduler is None
    sched.set_timesteps(3)
    assert tracker.calls == 0
    tracker.remove()  # twice is harmless


# ----------------------------------------------------------------------------------------------
# InstanceWrap
# ----------------------------------------------------------------------------------------------


class Thing:
    def method(self, a, b=2):
        return a + b


def test_instance_wrap_of_a_class_attribute():
    obj = Thing()
    wrap = InstanceWrap(obj, "method", lambda orig: lambda *a, **k: 10 * orig(*a, **k))
    assert (wrap.had_own, obj.method(1)) == (False, 30)
    assert Thing().method(1) == 3  # the class is untouched
    assert obj.method.__wrapped__ == wrap.original and obj.method.__name__ == "method"
    assert inspect.signature(obj.method) == inspect.signature(Thing().method)
    wrap.restore()
    assert "method" not in vars(obj) and obj.method(1) == 3
    obj.method = "set later by someone else"
    wrap.restore()  # restoring twice does nothing
    assert obj.method == "set later by someone else"


@pytest.mark.parametrize("order", ["last first", "first first"])
def test_instance_wraps_of_one_attribute_layer_and_come_off_in_any_order(order):
    """The runtime and a sampler both wrap a scheduler's ``step``: each restore() takes off its own
    layer, whichever goes first (a swapped scheduler is let go by both, in either order)."""
    obj = Thing()
    inner = InstanceWrap(obj, "method", lambda orig: lambda a: orig(a) + 1)  # (a * 3) + 1
    outer = InstanceWrap(obj, "method", lambda orig: lambda a: 10 * orig(a))  # 10 * (a * 3 + 1)
    assert obj.method(1) == 40 and inspect.signature(obj.method) == inspect.signature(Thing().method)
    first, second = (outer, inner) if order == "last first" else (inner, outer)
    first.restore()
    assert obj.method(1) == (4 if first is outer else 30)
    second.restore()
    assert "method" not in vars(obj) and obj.method(1) == 3
    third = InstanceWrap(obj, "method", lambda orig: lambda a: -orig(a))  # a fresh dispatcher
    assert obj.method(1) == -3 and third.had_own is False
    third.restore()
    assert "method" not in vars(obj)


def test_instance_wrap_of_an_instance_attribute():
    obj = Thing()
    own = lambda a: -a  # noqa: E731
    obj.method = own
    wrap = InstanceWrap(obj, "method", lambda orig: lambda a: orig(a) * 2)
    assert (wrap.had_own, obj.method(3)) == (True, -6)
    wrap.restore()
    assert vars(obj)["method"] is own


# ----------------------------------------------------------------------------------------------
# BranchStates
# ----------------------------------------------------------------------------------------------


class Box(BaseState):
    def __init__(self, start=0, scale=1):
        self.start, self.scale = start, scale
        self.reset()

    def reset(self):
        self.value = self.start


def test_branch_states_one_state_per_cache_context():
    states = BranchStates(Box, init_args=(5,), init_kwargs={"scale": 3})
    default = states.get_state()
    assert states.branch == "default" and (default.value, default.scale) == (5, 3)
    assert states.get_state() is default
    states.set_context(CacheContext("cond"))
    cond = states.get_state()
    assert states.branch == "cond" and cond is not default and states.get_state() is cond
    states.set_context(CacheContext("uncond"))
    uncond = states.get_state()
    assert uncond is not cond and uncond is not default
    copy = states.states()
    assert copy == {"default": default, "cond": cond, "uncond": uncond}
    copy.clear()
    assert len(states.states()) == 3
    states.set_context(None)
    assert states.branch == "default" and states.get_state() is default


def test_branch_states_reset_forgets_states_but_not_the_branch():
    states = BranchStates(Box)
    states.set_context(CacheContext("cond"))
    old = states.get_state()
    old.value = 9
    states.reset()
    assert states.states() == {} and states.branch == "cond"
    new = states.get_state()
    assert new is not old and new.value == 0 and old.value == 0  # state.reset() was called


# ----------------------------------------------------------------------------------------------
# HookSet
# ----------------------------------------------------------------------------------------------


class AddOne(ModelHook):
    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.resets = []

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs) + 1

    def reset_state(self, module):
        self.resets.append(module)
        return module


def _lin(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 3)


def test_hookset_remove_leaves_modules_exactly_as_before():
    root = torch.nn.Sequential(_lin(0), _lin(1))
    before = {n: dict(vars(m)) for n, m in root.named_modules()}
    base, base0 = root(X), root[0](X)
    hooks = HookSet("plug", root)
    a, b = AddOne(), AddOne()
    hooks.add(root[0], a)
    hooks.add(root, b)
    assert hooks.modules == [root[0], root] and hooks.hooks == [a, b]
    assert torch.equal(root[0](X), base0 + 1) and torch.equal(root(X), root[1](base0 + 1) + 1)
    hooks.reset()
    assert a.resets == [root[0]] and b.resets == [root]
    hooks.remove()
    assert {n: dict(vars(m)) for n, m in root.named_modules()} == before
    assert torch.equal(root(X), base) and hooks.modules == [] and hooks.hooks == []


def test_hookset_keeps_an_instance_forward_and_other_hooks():
    lin = _lin()
    own = lin.forward  # an instance-level forward that was there before
    lin.forward = own
    other = HookSet("other", lin)
    other.add(lin, AddOne())
    mine = HookSet("mine", lin)
    mine.add(lin, AddOne())
    assert torch.allclose(lin(X), own(X) + 2)
    mine.remove()
    # the other plugin's hook is still there, and so is the registry
    assert torch.allclose(lin(X), own(X) + 1) and isinstance(lin._diffusers_hook, HookRegistry)
    other.remove()
    assert vars(lin)["forward"] is own and not hasattr(lin, "_diffusers_hook")


def test_hookset_remove_after_the_registry_is_gone():
    lin = _lin()
    hooks = HookSet("plug", lin)
    hooks.add(lin, AddOne())
    del lin._diffusers_hook
    hooks.remove()
    assert hooks.modules == []


def test_hookset_invalidates_the_parents_child_registry_cache():
    root = torch.nn.Sequential(_lin(0), _lin(1))
    top = HookSet("top", root)
    top.add(root, AddOne())
    registry = root._diffusers_hook
    assert registry._get_child_registries() == []  # now cached
    inner = HookSet("inner", root)
    inner.add(root[1], AddOne())
    assert registry._get_child_registries() == [root[1]._diffusers_hook]
    inner.remove()
    assert registry._get_child_registries() == []
    registry._child_registries_cache = ["stale"]
    invalidate_registry_caches(root)
    assert registry._child_registries_cache is None


def test_hookset_goes_beneath_accelerate_and_comes_off_cleanly():
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    lin = _lin()
    base = lin(X)
    add_hook_to_module(lin, AccelerateHook())
    outer, inner = lin.forward, lin._old_forward
    hooks = HookSet("plug", lin)
    hooks.add(lin, AddOne())
    # our hook wraps accelerate's inner forward; accelerate's wrapper stays outermost
    assert lin.forward is outer and lin._old_forward is not inner
    assert torch.allclose(lin(X), base + 1)
    hooks.remove()
    assert lin.forward is outer and lin._old_forward == inner and not hasattr(lin, "_diffusers_hook")
    assert torch.equal(lin(X), base)
    remove_hook_from_module(lin)
    assert torch.equal(lin(X), base)


def test_hookset_remove_keeps_accelerate_added_after_it():
    """Offload enabled after apply: accelerate wraps our hooked forward; removing our hook keeps its."""
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module

    lin = _lin()
    base = lin(X)
    hooks = HookSet("plug", lin)
    hook = hooks.add(lin, AddOne())
    assert hook._diffboost_had_forward is False
    add_hook_to_module(lin, AccelerateHook())
    outer = lin.forward
    assert torch.allclose(lin(X), base + 1)
    hooks.remove()
    assert lin.forward is outer and not hasattr(lin, "_diffusers_hook") and torch.equal(lin(X), base)


def test_hookset_keeps_a_registry_that_was_there_before():
    """The pipeline's cache_context creates an (empty) registry on the denoiser; remove() keeps it."""
    lin = _lin()
    registry = HookRegistry.check_if_exists_or_initialize(lin)
    before = dict(vars(lin))
    hooks = HookSet("plug", lin)
    hooks.add(lin, AddOne())
    hooks.remove()
    assert lin._diffusers_hook is registry and registry.hooks == {} and dict(vars(lin)) == before
    # a registry made by one plugin and shared with another goes once both are off (removed last
    # first, as Acceleration.remove does)
    lin = _lin()
    a, b = HookSet("a", lin), HookSet("b", lin)
    a.add(lin, AddOne())
    b.add(lin, AddOne())
    b.remove()
    assert hasattr(lin, "_diffusers_hook")
    a.remove()
    assert not hasattr(lin, "_diffusers_hook") and "forward" not in vars(lin)


class _StubPipe:
    """What CallTracker uses of a pipeline: check_inputs, a scheduler, progress_bar (both forms)."""

    def __init__(self):
        self.scheduler = SimpleNamespace(set_timesteps=lambda n: setattr(self.scheduler, "timesteps", list(range(n))))
        self.nested = None

    def check_inputs(self, prompt):
        return prompt

    def progress_bar(self, iterable=None, total=None):
        import contextlib

        if iterable is not None:
            return iter(iterable)
        return contextlib.nullcontext(SimpleNamespace(update=lambda: None))

    def __call__(self, prompt, iterable_bar=False):
        self.check_inputs(prompt)
        self.scheduler.set_timesteps(3)
        if iterable_bar:
            for _ in self.progress_bar(self.scheduler.timesteps):
                if self.nested:
                    self.nested()
        else:
            with self.progress_bar(total=3) as bar:
                for _ in range(3):
                    if self.nested:
                        self.nested()
                    bar.update()
        return prompt


@pytest.mark.parametrize("iterable_bar", [False, True])
def test_a_nested_call_is_refused_and_the_guard_is_released(iterable_bar):
    from diffboost.plugins.runtime import ConcurrentCallError

    pipe = _StubPipe()
    tracker = CallTracker(pipe)
    assert pipe(prompt="a", iterable_bar=iterable_bar) == "a" and tracker.calls == 1
    pipe.nested = lambda: pipe("b", iterable_bar)
    with pytest.raises(ConcurrentCallError, match=r"already running a call \(started by the same thread"):
        pipe("a", iterable_bar=iterable_bar)
    assert tracker.calls == 2  # the refused call never reached set_timesteps
    pipe.nested = None
    assert pipe("c", iterable_bar=iterable_bar) == "c" and tracker.calls == 3  # released after the error

    def boom():
        raise KeyError("inside the loop")

    pipe.nested = boom
    with pytest.raises(KeyError):
        pipe("d", iterable_bar=iterable_bar)
    pipe.nested = None
    assert pipe("e", iterable_bar=iterable_bar) == "e"  # an error inside the loop releases it too
    tracker.remove()
    assert "progress_bar" not in vars(pipe) and "check_inputs" not in vars(pipe)
    inner = []

    def once():
        if not inner:
            inner.append(None)
            inner[0] = pipe("f", iterable_bar)

    pipe.nested = once
    pipe("g", iterable_bar=iterable_bar)  # nothing guards an unpatched pipeline
    assert inner == ["f"]


def test_a_refused_call_is_refused_at_check_inputs_before_it_stores_settings():
    from diffboost.plugins.runtime import ConcurrentCallError

    pipe = _StubPipe()
    tracker = CallTracker(pipe)
    tracker._enter_loop()  # another call's loop runs
    stored = []
    original = pipe.check_inputs
    with pytest.raises(ConcurrentCallError):
        pipe.check_inputs("x")
        stored.append("settings")
    assert stored == [] and original is not None
    tracker._leave_loop()
    assert pipe.check_inputs("y") == "y"
    tracker.remove()


def test_the_guard_passes_every_argument_through_and_names_the_other_thread():
    import threading

    from diffboost.plugins.runtime import ConcurrentCallError

    seen = []

    class Pipe(_StubPipe):
        def check_inputs(self, prompt, height=None):
            seen.append(("check_inputs", prompt, height))

        def progress_bar(self, iterable=None, total=None):
            seen.append(("progress_bar", total))
            return SimpleNamespace(total=total, __enter__=None)

    pipe = Pipe()
    tracker = CallTracker(pipe)
    pipe.check_inputs("a", height=64)
    bar = pipe.progress_bar(total=7)
    assert seen == [("check_inputs", "a", 64), ("progress_bar", 7)]
    assert bar.total == 7  # attributes of the pipeline's own bar read through the wrapper

    inside, leave = threading.Event(), threading.Event()

    def other_call():
        tracker._enter_loop()
        inside.set()
        leave.wait(10)
        tracker._leave_loop()

    worker = threading.Thread(target=other_call)
    worker.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ConcurrentCallError, match=rf"started by thread {worker.ident}\)"):
            pipe.check_inputs("b")
        tracker._leave_loop()  # another thread's loop is not ours to end
        with pytest.raises(ConcurrentCallError):
            pipe.scheduler.set_timesteps(3)
    finally:
        leave.set()
        worker.join(10)
    pipe.scheduler.set_timesteps(3)  # free again
    tracker.remove()


def test_set_branch_is_what_a_pipelines_cache_context_does():
    """runtime.set_branch is the one use of diffusers' private ``_set_cache_context`` (checked on
    diffusers 0.42.1): it names the branch for every stateful hook under the module, None clears it."""
    from diffboost.plugins.runtime import BranchStates, set_branch

    class Stateful(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state = BranchStates(_Box)

        def reset_state(self, module):
            return module

    class _Box(BaseState):
        def reset(self):
            pass

    outer, inner = torch.nn.Sequential(torch.nn.Linear(2, 2)), None
    inner = outer[0]
    hooks = []
    for module in (outer, inner):
        hook = Stateful()
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "t")
        hooks.append(hook)
    set_branch(outer, "call1")
    assert [h.state.branch for h in hooks] == ["call1", "call1"]
    assert all(h.state._context == CacheContext("call1") for h in hooks)
    set_branch(outer, None)
    assert [h.state.branch for h in hooks] == ["default", "default"]


@pytest.mark.parametrize("family, branches", [
    ("chroma", {"default": 6, "call1": 6}),  # cond, then uncond, unnamed by the pipeline
    ("lumina2", {"default": 6, "call1": 6}),
    ("flux", {"cond": 6}),  # named by the pipeline
    ("wan", {"cond": 6, "uncond": 6}),
    ("sd3", {"default": 6}),  # one call on a doubled batch
    ("z_image", {"default": 6}),  # a doubled batch passed positionally, as lists
])
def test_every_cfg_pass_gets_its_own_branch(family, branches):
    """The runtime counts the denoiser calls of a call per CFG branch; a pipeline that runs its
    conditional and unconditional passes as separate calls without naming them gets them named by
    their order within the step, so that every plugin keeps one state per pass."""
    import diffboost
    from diffboost import TaylorSeer
    from factories import FAMILIES, run

    pipe = FAMILIES[family]()
    base = run(pipe, family, num_inference_steps=6)
    with diffboost.accelerated(pipe, TaylorSeer(interval=1)):
        assert torch.equal(run(pipe, family, num_inference_steps=6), base)
        info = diffboost.describe(pipe)
    assert info["denoiser_calls"] == {"transformer": branches}
    assert {b: s["steps"] for b, s in info["last_call"][0]["branches"].items()} == branches
    with diffboost.accelerated(pipe, TaylorSeer(interval=3, warmup=1)):
        run(pipe, family, num_inference_steps=6)
        info = diffboost.describe(pipe)
    assert {b: s["full_steps"] for b, s in info["last_call"][0]["branches"].items()} == {b: [0, 3] for b in branches}


def test_every_denoiser_run_gets_the_next_run_number_also_a_fallback():
    """StepPlan.run tells units which denoiser run a call of theirs belongs to (a module run twice in a
    block keeps one series per run): one more at every run, and at the NaN fallback's second run."""
    class RunProbe(Probe):
        def forward(self, x):
            runs.append(self.clock.plan.run)
            return super().forward(x)

    runs: list[int] = []
    pipe = StubPipe(StubScheduler())
    tracker = CallTracker(pipe)
    clock = StepClock(tracker, every(2))
    probe = RunProbe()
    probe.clock, probe.nan_on_forecast = clock, {1}
    hooks = HookSet("test", probe)
    hooks.add(probe, clock)
    pipe.scheduler.set_timesteps(4)
    outs = [probe(x=X) for _ in range(4)]  # keyword arguments reach the fallback's run too
    assert all(torch.equal(o, 2 * X) for o in outs)
    # step 1 is a forecast step that returns NaN: the clock runs it again in full
    assert runs == [1, 2, 3, 4, 5] and clock.stats()["default"]["nan_fallbacks"] == 1


class StepScheduler(StubScheduler):
    def step(self, model_output, timestep, sample, *, scale=1.0, return_dict=True):
        return (sample + scale * model_output,)


class Named(ModelHook):
    """An inner stateful hook: records the branch it sees at each call."""

    _is_stateful = True

    def __init__(self, seen):
        super().__init__()
        self.state = BranchStates(Box)
        self.seen = seen

    def new_forward(self, module, *args, **kwargs):
        self.seen.append(self.state.branch)
        return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module):
        return module


def test_unnamed_passes_are_named_by_their_order_within_a_step():
    """Three denoiser calls per step that the pipeline does not name: "default", "call1", "call2" for
    every hook inside; named ones keep the pipeline's name; the scheduler's step (keyword arguments
    passed through) starts the order again, and the counts are the last call's."""
    from diffboost.plugins.runtime import DenoiserCalls

    pipe = StubPipe(StepScheduler())
    tracker = CallTracker(pipe)
    model = torch.nn.Linear(3, 3)
    seen: list[str] = []
    inner, outer = HookSet("inner", model), HookSet("calls", model)
    inner.add(model, Named(seen))
    counter = outer.add(model, DenoiserCalls(tracker))
    x = torch.ones(1, 3)
    for _ in range(2):  # two pipeline calls: the counts are the last one's
        pipe.scheduler.set_timesteps(2)
        for _ in range(2):
            outs = [model(x), model(input=x), model(x)]
            assert pipe.scheduler.step(outs[0], 0, x, scale=0.0)[0] is not None
        with torch.no_grad():
            _set_cache_context(model, CacheContext("cond"))
            model(x)
            _set_cache_context(model, None)
    assert pipe.scheduler.step(torch.ones(1), 0, torch.zeros(1), scale=2.0) == (torch.full((1,), 2.0),)
    assert seen == (["default", "call1", "call2"] * 2 + ["cond"]) * 2
    assert counter.counts == {"default": 2, "call1": 2, "call2": 2, "cond": 1}
    outer.remove()
    inner.remove()
    tracker.remove()
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)


def test_advance_step_index_is_what_a_schedulers_own_step_does():
    """runtime.advance_step_index is the one write of diffusers' private ``_step_index`` (checked on
    diffusers 0.42.1): a step a sampler integrated itself moves the index as the scheduler's step would."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffboost.plugins.runtime import advance_step_index

    a, b = FlowMatchEulerDiscreteScheduler(), FlowMatchEulerDiscreteScheduler()
    for s in (a, b):
        s.set_timesteps(4)
    advance_step_index(a)  # not started: left alone
    assert a.step_index is None
    x = torch.zeros(1)
    for s in (a, b):
        s.step(torch.ones(1), s.timesteps[0], x)
    advance_step_index(a)
    b.step(torch.ones(1), b.timesteps[1], x)
    assert a.step_index == b.step_index == 2


def test_sada_is_the_runtimes_step_solver_while_installed():
    import diffboost
    from factories import make_flux

    pipe = make_flux()
    handle = diffboost.apply(pipe, diffboost.SADA(), diffboost.TaylorSeer())
    (sada,) = [i for i in handle.installed if type(i).__name__ == "SADARuntime"]
    assert handle.tracker.step_solver is sada
    handle.remove()
    assert handle.tracker.step_solver is None
    with diffboost.accelerated(pipe, diffboost.TaylorSeer()) as other:
        assert other.tracker.step_solver is None


def test_plugins_talk_through_typed_events():
    """The tracker delivers events to their subscribers only: a scheduler step (or a sampler's own,
    via step_done) is a StepEnded; a StageSwitched reaches its own handlers; remove() forgets them."""
    from diffboost.plugins.runtime import StageSwitched, StepEnded

    pipe = StubPipe(StepScheduler())
    tracker = CallTracker(pipe)
    heard: list = []
    tracker.subscribe(StepEnded, heard.append)
    tracker.subscribe(StageSwitched, lambda e: heard.append(("stage", e.stage, e.size)))
    pipe.scheduler.set_timesteps(2)
    pipe.scheduler.step(torch.ones(1), 0, torch.zeros(1))
    tracker.step_done()
    tracker.emit(StageSwitched(1, (4, 4), source=object()))
    assert heard == [StepEnded(), StepEnded(), ("stage", 1, (4, 4))]
    assert StageSwitched(1, (4, 4), source=1) == StageSwitched(1, (4, 4), source=2)  # the source is not data
    tracker.remove()
    tracker.emit(StepEnded())
    assert len(heard) == 3


def test_the_events_of_a_call_in_order_with_their_data():
    """CallStarted(call, steps); per step StepStarted(step), the clock's SkipDecided(name, branch,
    step, computed), StepEnded; a second call counts from 0 again; unsubscribe stops the delivery."""
    from diffboost.plugins.runtime import EVENTS, DenoiserCalls

    pipe = StubPipe(StepScheduler())
    tracker = CallTracker(pipe)
    probe = Probe()
    probe.clock = StepClock(tracker, every(2), name="Clock")
    HookSet("clock", probe).add(probe, probe.clock)
    HookSet("calls", probe).add(probe, DenoiserCalls(tracker))  # outermost, as the handle installs it
    heard: list = []
    for event_type in EVENTS:
        tracker.subscribe(event_type, heard.append)

    def one_call(n):
        pipe.scheduler.set_timesteps(n)
        for i in range(n):
            probe(torch.ones(1))
            probe(torch.ones(1))  # a second pass in the same step: no second StepStarted
            pipe.scheduler.step(torch.ones(1), i, torch.zeros(1))

    one_call(3)
    assert heard[0] == CallStarted(1, 3) and tracker.step == 3
    assert [e for e in heard if isinstance(e, (StepStarted, StepEnded))] == [StepStarted(0), StepEnded(),
                                                                         StepStarted(1), StepEnded(),
                                                                         StepStarted(2), StepEnded()]
    decided = [(e.plugin, e.branch, e.step, e.computed) for e in heard if isinstance(e, SkipDecided)]
    assert [d[:3] for d in decided] == [("Clock", "default", 0), ("Clock", "call1", 0), ("Clock", "default", 1),
                                        ("Clock", "call1", 1), ("Clock", "default", 2), ("Clock", "call1", 2)]
    assert [d[3] for d in decided] == [True, True, False, False, True, True]
    heard.clear()
    one_call(2)
    assert heard[0] == CallStarted(2, 2) and heard[1] == StepStarted(0) and tracker.step == 2
    tracker.unsubscribe(SkipDecided, heard.append)
    tracker.unsubscribe(SkipDecided, heard.append)  # twice: nothing to remove, no error
    assert not tracker.listens(SkipDecided) and tracker.listens(StepStarted)
    heard.clear()
    one_call(1)
    assert not [e for e in heard if isinstance(e, SkipDecided)] and StepStarted(0) in heard
