"""Plugin base class, plugin kinds and field validation.

A plugin is a small frozen dataclass: its fields are the hyperparameters, validated in
``__post_init__`` so that a bad value fails where it is written, with a message naming the field
and the allowed range. A plugin knows how to *install* itself on a pipeline through an adapter
(see :mod:`diffboost.plugins.adapters`) and returns the objects it installed, so that
:func:`diffboost.remove` can take them off again.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import PipelineAdapter
    from .runtime import CallTracker


class PluginKind(str, enum.Enum):
    """Where a plugin acts. The stacking rules in :mod:`diffboost.plugins.stacking` use it.

    - ``ATTENTION``: replaces attention processors of the denoiser (quantized / sparse kernels).
    - ``TOKENS``: reduces the tokens a block sees (token merging / pruning inside blocks).
    - ``CACHE``: reuses or forecasts denoiser features across steps (hooks on denoiser modules).
    - ``STEP``: decides per step whether the denoiser runs at all, working through the scheduler.
    - ``SAMPLER``: owns the denoising schedule (multi-resolution stages, one-step generators).
    - ``VLM``: acts on a Transformers vision-language model, not on a Diffusers pipeline.
    """

    ATTENTION = "attention"
    TOKENS = "tokens"
    CACHE = "cache"
    STEP = "step"
    SAMPLER = "sampler"
    VLM = "vlm"


@dataclasses.dataclass(frozen=True)
class CallStats:
    """What one installed plugin did in the last pipeline call, as :func:`diffboost.call_stats`
    returns it. The common part is read by the CLI, the demo and the bench without knowing the plugin.

    Attributes:
        plugin: the plugin's configuration (its ``repr``).
        reused: per CFG pass (``"cond"``, ``"uncond"``, ``"default"``, ...), the denoiser calls whose
            work the plugin replaced by reused, forecast or skipped results. Plugins that make calls
            cheaper instead (fewer tokens, lower resolution) report none here; their savings are in
            ``details``.
        skipped_steps: the step indices on which it did so (any pass), ascending.
        details: the plugin's own numbers (per-pass schedules, token shares, stages, ...).
    """

    plugin: str
    reused: Mapping[str, int] = dataclasses.field(default_factory=dict)
    skipped_steps: tuple[int, ...] = ()
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def reused_calls(self) -> int:
        """Denoiser calls reused, forecast or skipped, over all passes."""
        return sum(self.reused.values())

    def as_dict(self) -> dict[str, Any]:
        """The details with the common part (what ``describe()["last_call"]`` lists)."""
        return {**self.details, "plugin": self.plugin, "reused_calls": self.reused_calls,
                "reused_per_pass": dict(self.reused), "skipped_steps": list(self.skipped_steps)}


class Installed:
    """Something a plugin put on a pipeline; ``remove`` must restore the exact previous state."""

    def remove(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-call state (called at the start of every pipeline call)."""

    def stats(self) -> dict[str, Any]:
        """The plugin's own per-call numbers (the ``details`` of :meth:`call_stats`)."""
        return {}

    def call_stats(self) -> CallStats:
        """The last call's statistics, typed; plugins that reuse or skip denoiser work override it to
        fill in the common part."""
        details = self.stats()
        return CallStats(str(details.get("plugin", type(self).__name__)), details=details)


@dataclasses.dataclass(frozen=True)
class Plugin:
    """Base class of every plugin config. Subclasses are frozen dataclasses."""

    #: Where the plugin acts (a class attribute, set by each plugin class; not a field).
    kind: ClassVar[PluginKind] = PluginKind.CACHE
    #: former keyword names still accepted (old name -> new name; see :func:`renamed_fields`)
    renamed: ClassVar[Mapping[str, str]] = {}
    #: plugin kinds this plugin cannot be stacked with, and why (checked by ``apply``)
    refuses: ClassVar[Mapping[PluginKind, str]] = {}
    #: the field that trades fidelity for speed, larger = faster (what :func:`diffboost.calibrate`
    #: tunes); None when the plugin has no single such knob
    strength: ClassVar[str | None] = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def install(self, adapter: "PipelineAdapter", tracker: "CallTracker") -> list[Installed]:  # pragma: no cover
        raise NotImplementedError

    def never_skips(self) -> bool:
        """True when the configuration can never change the output (used by tests and describe)."""
        return False

    def tunable_field(self) -> str | None:
        """The field :func:`diffboost.calibrate` tunes in this configuration (``strength`` unless
        the configuration makes it inert)."""
        return self.strength


def install_each(adapter: Iterable[Any], install_one: Any) -> list[Installed]:
    """``install_one(denoiser)`` on every denoiser of the pipeline; when one refuses, the ones already
    installed are removed again before the error goes on (Wan 2.2 has two denoisers)."""
    done: list[Installed] = []
    try:
        for denoiser in adapter:
            done.append(install_one(denoiser))
    except BaseException:
        for item in reversed(done):
            item.remove()
        raise
    return done


def renamed_fields(**old_to_new: str):
    """Class decorator (outside ``@dataclass``): keyword arguments renamed in a later version keep
    working for one more release, with a ``DeprecationWarning`` naming the new keyword; giving both
    names is an error. The mapping is kept as ``cls.renamed`` so that ``diffboost.load`` reads stack
    files written before the rename."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: give {new}= only ({old}= is its former name)")
                    warnings.warn(f"{cls.__name__}({old}=...) is renamed {new}=...; the old name will be "
                                  f"removed in diffboost 0.3", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls.renamed = dict(old_to_new)
        return cls

    return decorate


# ----------------------------------------------------------------------------------------------
# validation helpers: each raises ValueError/TypeError naming the plugin, field and allowed range
# ----------------------------------------------------------------------------------------------


def _where(obj: object, field: str) -> str:
    return f"{type(obj).__name__}.{field}"


def check_int(obj: object, field: str, lo: int | None = None, hi: int | None = None) -> None:
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_where(obj, field)} must be an int, got {type(value).__name__} ({value!r})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{_where(obj, field)}={value} is out of range; allowed: {_range(lo, hi)}")


def check_float(
    obj: object, field: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_where(obj, field)} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{_where(obj, field)} must be finite, got {value}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    if bad_lo or (hi is not None and value > hi):
        lo_txt = None if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        raise ValueError(f"{_where(obj, field)}={value} is out of range; allowed: {_range(lo, hi, lo_txt)}")


def check_bools(obj: object) -> None:
    """Every ``bool`` field of a config dataclass holds True or False (``lite="yes"`` is refused,
    not read as true)."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.init and f.type in ("bool", bool):
            value = getattr(obj, f.name)
            if not isinstance(value, bool):
                raise TypeError(f"{_where(obj, f.name)} must be True or False, got {type(value).__name__} ({value!r})")


def check_choice(obj: object, field: str, choices: Iterable[Any]) -> None:
    value = getattr(obj, field)
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{_where(obj, field)}={value!r} is not supported; choose one of {choices}")


def _range(lo: Any, hi: Any, lo_txt: str | None = None) -> str:
    lo_txt = lo_txt if lo_txt is not None else (None if lo is None else f">= {lo}")
    parts = [p for p in (lo_txt, None if hi is None else f"<= {hi}") if p]
    return " and ".join(parts) if parts else "any"
