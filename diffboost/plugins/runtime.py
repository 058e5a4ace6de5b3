"""Per-call machinery shared by plugins: call tracking, CFG-branch state and the step clock.

- :class:`CallTracker` wraps ``pipe.scheduler.set_timesteps`` *on the instance* (never the class):
  every Diffusers pipeline calls it once at the start of ``__call__``, so it is our signal that a new
  generation begins; all installed plugins then reset their per-call state. It also wraps the
  pipeline instance's ``progress_bar`` (every pipeline's denoising loop runs inside it) to know when
  a call's loop runs, and refuses a second call that starts meanwhile (from another thread, or from
  a step callback) with :class:`ConcurrentCallError` instead of mixing the two calls' state: at its
  ``check_inputs`` (the first thing a Diffusers ``__call__`` does), else at ``set_timesteps``. A
  second call that starts during the first call's short set-up (prompt encoding, before its loop)
  is not seen; put a lock around ``pipe(...)`` when several threads share one pipeline.
- :class:`BranchStates` is a ``diffusers.hooks.StateManager`` that falls back to a ``"default"``
  branch when the pipeline sets no ``cache_context`` (doubled-batch CFG pipelines): pipelines that do
  (Flux true-CFG, Wan) get one state per ``"cond"`` / ``"uncond"`` branch for free.
- :class:`StepClock` is the denoiser-level hook: it counts denoiser calls per branch and asks the
  plugin's policy for a :class:`StepPlan` that the unit hooks inside the denoiser read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .pytree import flatten

logger = logging.getLogger("diffboost")


def compiled_around(*methods: str, recursive: bool = False) -> Callable[[type], type]:
    """Class decorator: keep the named methods out of ``torch.compile`` graphs.

    ``recursive=False`` (hooks' ``new_forward``): only the method's own frame is skipped; the module
    forward it calls is still compiled, so regional compilation of blocks (``block.compile()``,
    ``transformer.compile_repeated_blocks()``) keeps whole-block graphs when the hook sits on the
    block. ``recursive=True`` (host-side bookkeeping such as Taylor factors
    and cache gates): nothing they call is traced either, so Dynamo neither breaks graphs on their
    host syncs nor recompiles them as their counters change. Applied to the class rather than as a
    method decorator so that the methods stay plain functions (mutation testing mutates only those).
    """

    def wrap(cls: type) -> type:
        for name in methods:
            fn = cls.__dict__[name]
            setattr(cls, name, torch.compiler.disable(fn, recursive=recursive))
        return cls

    return wrap


class InstanceWrap:
    """Wrap ``obj.<name>`` by ``make(original)`` on the *instance* only (never the class).

    Every wrapper of one attribute goes through a single dispatcher installed on the instance with the
    first one: each layer wraps the layers below it (the first made is the innermost), and
    ``restore()`` takes off its own layer only, in any order (a sampler that follows a swapped
    scheduler can let go of the old one before or after the runtime does). The last ``restore()``
    leaves the instance exactly as before. The dispatcher keeps the original's signature
    (``functools.wraps``: pipelines inspect ``set_timesteps`` for ``sigmas=`` support).
    """

    def __init__(self, obj: Any, name: str, make: Callable[[Callable], Callable]):
        self.obj, self.name, self.make = obj, name, make
        current = getattr(obj, name)
        if getattr(current, "_diffboost_layers", None) is None or vars(obj).get(name) is not current:
            base, had_own = current, name in vars(obj)

            def dispatcher(*args: Any, **kwargs: Any) -> Any:
                return dispatcher._diffboost_call(*args, **kwargs)

            functools.wraps(base)(dispatcher)
            dispatcher._diffboost_base, dispatcher._diffboost_had_own = base, had_own
            dispatcher._diffboost_layers = []
            setattr(obj, name, dispatcher)
            current = dispatcher
        self.dispatcher = current
        current._diffboost_layers.append(self)
        _compose(current)

    @property
    def original(self) -> Callable:
        """The attribute as it was before the first layer."""
        return self.dispatcher._diffboost_base

    @property
    def had_own(self) -> bool:
        """Whether the instance had its own attribute (not the class's) before the first layer."""
        return self.dispatcher._diffboost_had_own

    def restore(self) -> None:
        if self.obj is None:
            return
        d, obj, name = self.dispatcher, self.obj, self.name
        self.obj = None
        if self in d._diffboost_layers:
            d._diffboost_layers.remove(self)
        if d._diffboost_layers:
            _compose(d)
        elif vars(obj).get(name) is d:
            if d._diffboost_had_own:
                setattr(obj, name, d._diffboost_base)
            else:
                obj.__dict__.pop(name, None)


def _compose(dispatcher: Any) -> None:
    fn = dispatcher._diffboost_base
    for layer in dispatcher._diffboost_layers:
        fn = layer.make(fn)
    dispatcher._diffboost_call = fn


class ConcurrentCallError(RuntimeError):
    """An accelerated pipeline was called while it was already running a call."""


class _LoopBar:
    """The pipeline's progress bar, marking its call's denoising loop as running while it is open
    (``with pipe.progress_bar(total=n) as bar:`` or ``for t in pipe.progress_bar(timesteps):``)."""

    def __init__(self, bar: Any, tracker: "CallTracker"):
        self._bar, self._tracker = bar, tracker

    def __enter__(self) -> Any:
        self._tracker._enter_loop()
        try:
            return self._bar.__enter__()
        except BaseException:
            self._tracker._leave_loop()
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._tracker._leave_loop()

    def __iter__(self) -> Any:
        self._tracker._enter_loop()
        try:
            yield from self._bar
        finally:
            self._tracker._leave_loop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


@dataclasses.dataclass(frozen=True)
class CallStarted:
    """Event: a pipeline call starts (its scheduler's ``set_timesteps`` ran); every per-call state
    resets on it."""

    #: pipeline calls seen by this runtime, this one included (1 for the first)
    call: int
    #: solver steps the call will take (None when the scheduler does not say)
    num_steps: int | None


@dataclasses.dataclass(frozen=True)
class StepStarted:
    """Event: the first denoiser call of a solver step begins (any CFG pass; sent before the plugins
    inside the denoiser decide anything)."""

    #: solver steps taken so far in this call (0 for the first step)
    step: int


@dataclasses.dataclass(frozen=True)
class SkipDecided:
    """Event: a plugin decided whether one denoiser call (or a whole step, for a step sampler) is
    computed in full or answered from its cache/forecast. Sent only when someone subscribed."""

    plugin: str
    #: the CFG pass (``"default"`` for a batched pass, ``"cond"``/``"uncond"``, ``"call1"`` ...)
    branch: str
    #: the plugin's own step index of that branch
    step: int
    computed: bool


@dataclasses.dataclass(frozen=True)
class StepEnded:
    """Event: a solver step was taken (the scheduler's ``step`` ran, or a sampler integrated one)."""


@dataclasses.dataclass(frozen=True)
class StageSwitched:
    """Event: a sampler moved the latents to another resolution; features stored for the previous
    stage no longer match (sent by bottleneck sampling; the handle resets the other plugins)."""

    stage: int
    size: tuple[int, ...]
    source: Any = dataclasses.field(default=None, compare=False, repr=False)


#: every event type a runtime sends, in the order they occur within a call
EVENTS = (CallStarted, StepStarted, SkipDecided, StepEnded, StageSwitched)


class CallTracker:
    """Signals the start of every pipeline call by wrapping the scheduler instance's ``set_timesteps``,
    and refuses a call that starts while another one's denoising loop runs (see the module doc)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        #: event type -> handlers (called with the event), see :meth:`subscribe`
        self._handlers: dict[type, list[Callable[[Any], None]]] = {}
        self.num_steps: int | None = None
        #: solver steps taken in the current call (see :meth:`step_done`)
        self.step = 0
        #: a step plugin that decides the steps a sampler integrates on its own sigmas (SADA registers
        #: itself: ``solve_flow_step``); None when the stack has none
        self.step_solver: Any = None
        self.calls = 0
        self.scheduler = None
        self._patch: InstanceWrap | None = None
        self._step_patch: InstanceWrap | None = None
        #: denoiser calls since the scheduler's last step (the call order within a step names a CFG
        #: branch the pipeline does not name, see :class:`DenoiserCalls`)
        self.calls_since_step = 0
        self._running: int | None = None  # thread id of the call whose denoising loop runs
        self._guard = threading.Lock()
        self._pipe_patches: list[InstanceWrap] = []
        if callable(getattr(pipe, "progress_bar", None)):
            self._pipe_patches.append(InstanceWrap(
                pipe, "progress_bar", lambda original: lambda *a, **k: _LoopBar(original(*a, **k), self)
            ))
        if callable(getattr(pipe, "check_inputs", None)):
            # the first thing a Diffusers __call__ does, before it stores the call's settings on the
            # pipeline (self._guidance_scale, ...): a second call is refused before it overwrites them
            def make_check(original: Callable) -> Callable:
                def check_inputs(*args: Any, **kwargs: Any) -> Any:
                    self._refuse_if_running()
                    return original(*args, **kwargs)

                return check_inputs

            self._pipe_patches.append(InstanceWrap(pipe, "check_inputs", make_check))
        self._wrap(getattr(pipe, "scheduler", None))

    def _refuse_if_running(self) -> None:
        running = self._running
        if running is not None:
            who = "the same thread (a step callback?)" if running == threading.get_ident() else f"thread {running}"
            raise ConcurrentCallError(
                f"{type(self.pipe).__name__} is already running a call (started by {who}). An accelerated pipeline "
                "keeps per-call state, so it serves one call at a time: put a lock around pipe(...) or use one "
                "pipeline per thread (plain Diffusers pipelines are not thread-safe either)"
            )

    def _enter_loop(self) -> None:
        with self._guard:
            self._refuse_if_running()
            self._running = threading.get_ident()

    def _leave_loop(self) -> None:
        with self._guard:
            if self._running == threading.get_ident():
                self._running = None

    def _wrap(self, scheduler: Any) -> None:
        # remembered even when it cannot be wrapped, so that ensure_current does not retry every step
        self.scheduler = scheduler
        if scheduler is None or not hasattr(scheduler, "set_timesteps"):
            return

        def make(original: Callable) -> Callable:
            def set_timesteps(*args: Any, **kwargs: Any) -> Any:
                self._refuse_if_running()  # before the shared scheduler is touched
                out = original(*args, **kwargs)
                timesteps = getattr(scheduler, "timesteps", None)
                self.num_steps = int(len(timesteps)) if timesteps is not None else None
                self.new_call()
                return out

            return set_timesteps

        self._patch = InstanceWrap(scheduler, "set_timesteps", make)
        if callable(getattr(scheduler, "step", None)):

            def make_step(original: Callable) -> Callable:
                def step(*args: Any, **kwargs: Any) -> Any:
                    self.step_done()
                    return original(*args, **kwargs)

                return step

            self._step_patch = InstanceWrap(scheduler, "step", make_step)

    def ensure_current(self) -> None:
        """Follow ``pipe.scheduler = NewScheduler.from_config(...)`` done after ``apply``.

        Called at every denoiser call. The new scheduler's ``set_timesteps`` already ran unseen at
        the start of this call, so the call's step count is read from it and the call is started
        here: without that, the call would keep the previous call's step count (wrong
        ``steps_left``) and, on pipelines that diffusers does not reset at the end of a call
        (UNets), continue the previous call's step counters and stored features.
        """
        current = getattr(self.pipe, "scheduler", None)
        if current is not self.scheduler:
            self._unwrap()
            self._wrap(current)
            timesteps = getattr(current, "timesteps", None)
            self.num_steps = int(len(timesteps)) if timesteps is not None else None
            self.new_call()

    def steps_left(self, branch_step: int) -> int | None:
        """Solver steps left in this call, counting the current one.

        Read from the scheduler's own ``step_index`` where it has one, so that a denoiser that joins
        mid-schedule (Wan 2.2's low-noise expert) still knows where the call ends; else from the
        branch's own step count.
        """
        if self.num_steps is None:
            return None
        index = getattr(self.scheduler, "step_index", None)
        position = index if isinstance(index, int) else branch_step
        return self.num_steps - position

    def subscribe(self, event_type: type, handler: Callable[[Any], None]) -> None:
        """Call ``handler(event)`` for every :meth:`emit` of ``event_type`` (:data:`EVENTS`), in the
        order of subscription; plugins talk to each other through these, never directly."""
        if event_type not in EVENTS:
            raise TypeError(f"unknown event type {event_type!r}; events: {[e.__name__ for e in EVENTS]}")
        self._handlers.setdefault(event_type, []).append(handler)

    def unsubscribe(self, event_type: type, handler: Callable[[Any], None]) -> None:
        handlers = self._handlers.get(event_type, [])
        if handler in handlers:
            handlers.remove(handler)

    def listens(self, event_type: type) -> bool:
        """Has anyone subscribed to ``event_type``? (Hot paths build an event only then.)"""
        return bool(self._handlers.get(event_type))

    def emit(self, event: Any) -> None:
        for handler in list(self._handlers.get(type(event), ())):
            handler(event)

    def skip_decided(self, plugin: str, branch: str, step: int, computed: bool) -> None:
        """Announce a plugin's decision for one denoiser call (nothing is built without subscribers)."""
        if self._handlers.get(SkipDecided):
            self.emit(SkipDecided(plugin, branch, step, computed))

    def step_done(self) -> None:
        """A solver step was taken: the scheduler's ``step`` (wrapped here) ran, or a plugin that
        integrates a step itself instead of calling it (bottleneck sampling) says so."""
        self.calls_since_step = 0
        self.step += 1
        self.emit(StepEnded())

    def new_call(self) -> None:
        self.calls += 1
        self.calls_since_step = 0
        self.step = 0
        self.emit(CallStarted(self.calls, self.num_steps))

    def _unwrap(self) -> None:
        if self._step_patch is not None:
            self._step_patch.restore()
            self._step_patch = None
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        self.scheduler = None

    def remove(self) -> None:
        self._unwrap()
        for patch in reversed(self._pipe_patches):
            patch.restore()
        self._pipe_patches.clear()
        self._handlers.clear()


class BranchStates(StateManager):
    """One state object per CFG branch (diffusers cache context); ``"default"`` when none is set."""

    def get_state(self) -> Any:
        name = self._context.name if self._context is not None else "default"
        state = self._state_cache.get(name)
        if state is None:
            state = self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return state

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Forget every branch's state, but not the branch being run: a reset can come inside the
        pipeline's ``cache_context`` (a new call noticed at its first denoiser call, see
        :meth:`CallTracker.ensure_current`); the pipeline clears the context itself when it exits."""
        context = self._context
        super().reset(*args, **kwargs)
        self._context = context

    @property
    def branch(self) -> str:
        return self._context.name if self._context is not None else "default"

    def states(self) -> dict[str, Any]:
        return dict(self._state_cache)


@dataclasses.dataclass
class StepPlan:
    """What the units inside the denoiser do on the current call."""

    step: int = 0
    full: bool = True
    #: steps since the last full step (the Taylor expansion's k)
    k: int = 0
    branch: str = "default"
    #: set when a step must be computed whatever the units decide (NaN/Inf fallback)
    forced: bool = False
    #: solver steps left in the call, the current one included (None: unknown)
    steps_left: int | None = None
    #: counts the denoiser runs (a NaN fallback runs the same step again): units called several times
    #: in one run keep one series per call
    run: int = 0


class ClockState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.last_full = -1
        self.full_steps: list[int] = []
        self.forecast_steps: list[int] = []
        self.fallbacks = 0


#: policy(state, step, steps_left) -> compute the step in full?
Policy = Callable[[ClockState, int, "int | None"], bool]


@compiled_around("new_forward")
class StepClock(ModelHook):
    """Denoiser-level hook: counts steps per branch and sets the plan read by unit hooks.

    ``policy(state, step, steps_left) -> full`` decides whether the current step is computed.
    With ``check_finite`` the denoiser output of a forecast step is checked for NaN/Inf; if it is not
    finite the step is recomputed in full (logged once).
    """

    _is_stateful = True

    def __init__(self, tracker: CallTracker, policy: Policy, check_finite: bool = True, name: str = "diffboost"):
        super().__init__()
        self.tracker = tracker
        self.policy = policy
        self.check_finite = check_finite
        self.name = name
        self.state = BranchStates(ClockState)
        self.plan = StepPlan()
        self._warned = False

    def begin(self) -> StepPlan:
        """Start a denoiser call: decide the plan for this branch's current step."""
        self.tracker.ensure_current()
        st: ClockState = self.state.get_state()
        step = st.step
        steps_left = self.tracker.steps_left(step)
        full = st.last_full < 0 or bool(self.policy(st, step, steps_left))
        plan = self.plan
        plan.step, plan.full, plan.branch, plan.forced = step, full, self.state.branch, False
        plan.steps_left = steps_left
        plan.run += 1
        plan.k = 0 if full else step - st.last_full
        return plan

    def end(self, full: bool) -> None:
        st: ClockState = self.state.get_state()
        self.tracker.skip_decided(self.name, self.state.branch, st.step, full)
        if full:
            st.last_full = st.step
            st.full_steps.append(st.step)
        else:
            st.forecast_steps.append(st.step)
        st.step += 1

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.begin()
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not plan.full and self.check_finite and not _all_finite(output):
            if not self._warned:
                logger.warning(
                    "%s: a forecast step (step %d) produced NaN/Inf; falling back to a full step "
                    "(reported once per pipeline)", self.name, plan.step
                )
                self._warned = True
            self.state.get_state().fallbacks += 1
            plan.full, plan.k, plan.forced = True, 0, True
            plan.run += 1
            output = self.fn_ref.original_forward(*args, **kwargs)
        self.end(plan.full)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers resets stateful hooks at the end of every pipeline call: keep the call's statistics
        current = self._branch_stats()
        if current:
            self.last_stats = current
        self.state.reset()
        self.plan = StepPlan()
        return module

    def stats(self) -> dict[str, Any]:
        """Per-branch statistics of the current call, or of the last finished call."""
        return self._branch_stats() or dict(getattr(self, "last_stats", {}))

    def _branch_stats(self) -> dict[str, Any]:
        out = {}
        for branch, st in self.state.states().items():
            out[branch] = {
                "steps": st.step,
                "full": len(st.full_steps),
                "forecast": len(st.forecast_steps),
                "full_steps": list(st.full_steps),
                "nan_fallbacks": st.fallbacks,
            }
        return out


def advance_step_index(scheduler: Any) -> None:
    """Count a step that a sampler integrated itself (instead of calling ``scheduler.step``) on the
    scheduler's step index, as its own ``step`` would have, so that everything reading the index
    (the pipeline, :meth:`CallTracker.steps_left`) stays right.

    The one write of a private diffusers attribute (``_step_index``; checked on diffusers 0.42.1, whose
    schedulers expose it read-only as ``step_index``); ``tests/plugins/test_runtime.py`` pins it. A
    scheduler without a started index is left alone.
    """
    if getattr(scheduler, "_step_index", None) is not None:
        scheduler._step_index += 1


def set_branch(module: torch.nn.Module, name: str | None) -> None:
    """Name the CFG branch of the denoiser call about to run for every stateful hook under ``module``
    (``None`` clears it), as a pipeline's ``cache_context(name)`` does.

    The one place that uses diffusers' private ``diffusers.hooks.hooks._set_cache_context`` (checked on
    diffusers 0.42.1; ``CacheMixin.cache_context`` is the public form, but not every denoiser class
    derives from ``CacheMixin``). ``tests/plugins/test_runtime.py`` pins it.
    """
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(module, None if name is None else CacheContext(name))


class _Unnamed(BaseState):
    def reset(self) -> None:
        pass


@compiled_around("new_forward")
class DenoiserCalls(ModelHook):
    """The runtime's outermost hook on each denoiser: counts the pipeline's denoiser calls per CFG
    branch, and names the branch when the pipeline does not.

    Pipelines that run the conditional and unconditional passes as separate calls name them with
    ``cache_context("cond" / "uncond")`` (Flux true CFG, Wan); some do not (Chroma). Then the i-th call
    since the scheduler's last step is branch ``"default"`` (i = 0) or ``"call<i>"``, so that every
    plugin keeps one state per branch instead of mixing the two passes into one trajectory.
    """

    _is_stateful = True  # to receive the pipeline's cache context

    def __init__(self, tracker: CallTracker):
        super().__init__()
        self.tracker = tracker
        self.state = BranchStates(_Unnamed)
        #: denoiser calls per branch in the current (or last finished) pipeline call
        self.counts: dict[str, int] = {}
        tracker.subscribe(CallStarted, lambda event: self.counts.clear())

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.tracker.ensure_current()
        tracker = self.tracker
        order = tracker.calls_since_step
        tracker.calls_since_step += 1
        if order == 0 and tracker.listens(StepStarted):
            tracker.emit(StepStarted(tracker.step))
        named = self.state._context is not None
        branch = self.state._context.name if named else ("default" if order == 0 else f"call{order}")
        self.counts[branch] = self.counts.get(branch, 0) + 1
        if named or order == 0:
            return self.fn_ref.original_forward(*args, **kwargs)
        set_branch(module, branch)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            set_branch(module, None)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers resets stateful hooks at the end of a call: the counts stay until the next call
        self.state.reset()
        return module


def _all_finite(output: Any) -> bool:
    leaves, _ = flatten(output)
    return all(bool(torch.isfinite(t).all()) for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


def invalidate_registry_caches(root: torch.nn.Module) -> None:
    """Registries cache the list of their children's registries; drop it after adding/removing hooks."""
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry._child_registries_cache = None


class _BeneathAccelerate:
    """Run a registry operation *beneath* an accelerate hook (``enable_model_cpu_offload``).

    accelerate's wrapper calls ``module._old_forward`` and, at the end of every pipeline call,
    diffusers re-applies the offload hooks by restoring ``module.forward = module._old_forward``
    and wrapping it again. Hooks registered on top of accelerate's wrapper would be dropped by that;
    hooks registered on ``_old_forward`` survive it. Outside accelerate this does nothing.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.active = hasattr(module, "_hf_hook") and "_old_forward" in vars(module)

    def __enter__(self) -> None:
        if self.active:
            self.outer = self.module.forward
            self.module.forward = self.module._old_forward

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.module._old_forward = self.module.forward
            self.module.forward = self.outer


class HookSet:
    """Hooks registered by one plugin on a set of modules, removable together."""

    def __init__(self, name: str, root: torch.nn.Module):
        self.name = name
        self.root = root
        self.modules: list[torch.nn.Module] = []
        self.hooks: list[ModelHook] = []

    def add(self, module: torch.nn.Module, hook: ModelHook) -> ModelHook:
        existed = hasattr(module, "_diffusers_hook")
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if not existed:
            # ours to delete once empty; one made before us (e.g. by the pipeline's cache_context) stays
            registry._diffboost_created = True
        beneath = _BeneathAccelerate(module)
        with beneath:
            # whether the instance had its own forward before us (beneath accelerate, its inner
            # forward is the instance's own at this point)
            had_forward = "forward" in vars(module)
            registry.register_hook(hook, self.name)
        hook._diffboost_had_forward = had_forward
        self.modules.append(module)
        self.hooks.append(hook)
        invalidate_registry_caches(self.root)
        return hook

    def reset(self) -> None:
        for module, hook in zip(self.modules, self.hooks):
            hook.reset_state(module)

    def remove(self) -> None:
        for module, hook in reversed(list(zip(self.modules, self.hooks))):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            with _BeneathAccelerate(module):
                registry.remove_hook(self.name, recurse=False)
            if not registry.hooks:
                # leave the module exactly as it was: no instance-level forward, and no registry unless
                # it had one before
                if not hook._diffboost_had_forward and not hasattr(module, "_hf_hook"):
                    module.__dict__.pop("forward", None)
                if getattr(registry, "_diffboost_created", False):
                    del module._diffusers_hook
        self.modules.clear()
        self.hooks.clear()
        invalidate_registry_caches(self.root)
