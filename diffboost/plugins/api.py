"""Public API: ``apply``, ``remove``, ``accelerated``, ``describe``."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .adapters import PipelineAdapter
from .base import CallStats, Installed, Plugin
from .presets import resolve
from .runtime import CallStarted, CallTracker, DenoiserCalls, HookSet, StageSwitched
from .stacking import IncompatiblePluginsError, check_stack

_HANDLE_ATTR = "_diffboost_handle"


class Acceleration:
    """What :func:`apply` installed on one pipeline. Returned by ``apply``; ``remove()`` undoes it."""

    def __init__(self, pipe: Any, adapter: PipelineAdapter, plugins: list[Plugin]):
        self.pipe = pipe
        self.adapter = adapter
        self.plugins = plugins
        self.tracker = CallTracker(pipe)
        self.installed: list[Installed] = []
        self.tracker.subscribe(CallStarted, lambda event: self.reset())
        self.tracker.subscribe(StageSwitched, self._stage_switched)
        self.counters: list[tuple[HookSet, DenoiserCalls]] = []
        self.call_starts: Installed | None = None
        #: per finished stage of a multi-resolution sampler: the other plugins' statistics
        self.per_stage: list[list[dict[str, Any]]] = []

    def _install(self) -> None:
        try:
            for plugin in self.plugins:
                self.installed.extend(plugin.install(self.adapter, self.tracker))
            # last, so that it is the outermost hook: it sees every call the pipeline makes, also the
            # ones a plugin answers without running the denoiser
            for d in self.adapter:
                hooks = HookSet("diffboost_calls", d.module)
                self.counters.append((hooks, hooks.add(d.module, DenoiserCalls(self.tracker))))
            # models without a scheduler (vision-language models) say themselves when a call starts
            starts = getattr(self.adapter, "call_starts", None)
            if starts is not None:
                self.call_starts = starts(self.tracker)
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        """Forget all per-call state (done automatically at the start of every pipeline call)."""
        self.per_stage = []
        for item in self.installed:
            item.reset()

    def _stage_switched(self, event: StageSwitched) -> None:
        """A sampler changed resolution: every other plugin keeps the finished stage's statistics
        here and forgets its stored features."""
        others = [item for item in self.installed if item is not event.source]
        self.per_stage.append([item.call_stats().as_dict() for item in others])
        for item in others:
            item.reset()

    def remove(self) -> None:
        if self.call_starts is not None:
            self.call_starts.remove()
            self.call_starts = None
        for hooks, _ in reversed(self.counters):
            hooks.remove()
        self.counters.clear()
        for item in reversed(self.installed):
            item.remove()
        self.installed.clear()
        self.tracker.remove()
        if getattr(self.pipe, _HANDLE_ATTR, None) is self:
            delattr(self.pipe, _HANDLE_ATTR)

    def subscribe(self, event_type: type, handler: Any) -> None:
        """Call ``handler(event)`` on every event of ``event_type`` this pipeline's runtime sends
        (:mod:`diffboost.events`); until :meth:`remove`."""
        self.tracker.subscribe(event_type, handler)

    def call_stats(self) -> list[CallStats]:
        """Each installed plugin's statistics of the current (or last) call, typed."""
        return [item.call_stats() for item in self.installed]

    def describe(self) -> dict[str, Any]:
        stats = self.call_stats()
        # the pipeline's denoiser calls in the current (or last) call, per denoiser and CFG pass
        calls = {d.attr: dict(counter.counts) for d, (_, counter) in zip(self.adapter, self.counters)}
        total = sum(n for per_pass in calls.values() for n in per_pass.values())
        # a call that one plugin answers never reaches the plugins inside it: no call counts twice
        reused = sum(s.reused_calls for s in stats)
        return {
            **self.adapter.describe(),
            "plugins": [repr(p) for p in self.plugins],
            "calls": self.tracker.calls,
            "denoiser_calls": calls,
            "summary": {"denoiser_calls": total, "computed": total - reused, "reused": reused},
            "last_call": [s.as_dict() for s in stats],
            # with a multi-resolution sampler: the other plugins' statistics of each finished stage
            # (they reset at every switch; the last stage's are their "last_call" entries)
            "per_stage": list(self.per_stage),
        }

    def __repr__(self) -> str:
        return f"Acceleration({type(self.pipe).__name__}, plugins={self.plugins})"


def _as_plugins(items: tuple[Any, ...]) -> list[Plugin]:
    plugins: list[Plugin] = []
    for item in items:
        if isinstance(item, str):
            plugins.extend(resolve(item))
        elif isinstance(item, Plugin):
            plugins.append(item)
        elif isinstance(item, (list, tuple)):
            plugins.extend(_as_plugins(tuple(item)))
        else:
            raise TypeError(
                f"diffboost.apply takes plugin configs (e.g. diffboost.TaylorSeer()) or preset names, "
                f"got {type(item).__name__}: {item!r}"
            )
    return plugins


def apply(pipe: Any, *plugins: Any) -> Acceleration:
    """Patch ``pipe`` in place with ``plugins`` (configs or preset names) and return the handle.

    Raises ``UnsupportedPipelineError`` for a pipeline family diffboost does not know,
    ``IncompatiblePluginsError`` for a stack that cannot work, and ``ValueError`` when ``pipe``
    is already accelerated (call :func:`remove` first).
    """
    if getattr(pipe, _HANDLE_ATTR, None) is not None:
        raise ValueError(
            f"{type(pipe).__name__} is already accelerated with {getattr(pipe, _HANDLE_ATTR).plugins}; "
            "call diffboost.remove(pipe) first"
        )
    requested = _as_plugins(plugins)
    if not requested:
        raise ValueError("diffboost.apply needs at least one plugin or preset name")
    from ..vlm.adapter import VlmAdapter, is_vlm

    if is_vlm(pipe):
        from ..vlm.stacking import check_vlm_stack

        stack = check_vlm_stack(requested)
        adapter: Any = VlmAdapter.of(pipe)
    else:
        stack = check_stack(requested)
        _refuse_context_parallel(pipe, stack)
        adapter = PipelineAdapter(pipe)
    handle = Acceleration(pipe, adapter, stack)
    handle._install()
    setattr(pipe, _HANDLE_ATTR, handle)
    return handle


def _refuse_context_parallel(pipe: Any, stack: list[Any]) -> None:
    """diffusers' context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``) splits
    every sequence across ranks. diffboost's plugins are not built for that yet: a cache decides from
    the residuals this rank holds, so ranks would decide differently and wait on each other's
    collectives for ever; token merging and sparse/quantized attention change the shards' attention.
    Refused with a clear error rather than a hang."""
    for name in ("transformer", "transformer_2", "unet"):
        model = getattr(pipe, name, None)
        if getattr(model, "_parallel_config", None) is not None:
            names = ", ".join(type(p).__name__ for p in stack)
            raise IncompatiblePluginsError(
                f"{type(pipe).__name__}.{name} runs with diffusers' context parallelism; diffboost's plugins ({names}) "
                "do not support it yet (ranks would make different skip decisions from their own shards and stall "
                "in the collectives). Run the plugins without enable_parallelism, or shard the prompts instead: "
                "torchrun -m diffboost batch (one pipeline per rank)"
            )


def remove(pipe: Any) -> None:
    """Undo :func:`apply`: the pipeline behaves bit-identically to before. No-op if not accelerated."""
    handle = getattr(pipe, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


@contextlib.contextmanager
def accelerated(pipe: Any, *plugins: Any) -> Iterator[Acceleration]:
    """``with diffboost.accelerated(pipe, "fast"): pipe(...)`` -- removed on exit."""
    handle = apply(pipe, *plugins)
    try:
        yield handle
    finally:
        handle.remove()


def call_stats(pipe: Any) -> list[CallStats]:
    """What each plugin on ``pipe`` did in its last call, as typed records (empty when not accelerated):
    the common part (``reused`` denoiser calls per CFG pass, ``skipped_steps``) and the plugin's own
    ``details``."""
    handle = getattr(pipe, _HANDLE_ATTR, None)
    return handle.call_stats() if handle is not None else []


def describe(pipe: Any) -> dict[str, Any]:
    """What is patched on ``pipe`` and the statistics of its last call."""
    handle = getattr(pipe, _HANDLE_ATTR, None)
    if handle is None:
        return {"pipeline": type(pipe).__name__, "accelerated": False}
    return {"accelerated": True, **handle.describe()}
