"""Fit a plugin's speed knob to a fidelity target on the user's own model: ``diffboost.calibrate``.

A threshold that keeps 45 dB on one model can keep 39 dB on another (benchmarks/RESULTS.md, "The
speed-fidelity front": the same EasyCache threshold is cautious on the SD UNet and bold on the 128 px
Flux model). Instead of trusting it, measure it: run the plain pipeline once on a few calibration
prompts, then the accelerated one at a few settings of the plugin's *strength* field (the knob where
larger is faster and less faithful: ``EasyCache.threshold``, ``SADA.tolerance`` with the curvature
criterion, ``AdaptiveBlockCache.threshold``, ``ErrorControlledCache.tolerance``,
``TaylorSeer.interval``), and keep the strongest setting whose PSNR against the plain images is at
least the target plus a margin.

The search is geometric: from the given setting it doubles while the target holds (halves while it
does not), then bisects between the last setting that held and the first that did not. Each trial
is one accelerated run over the calibration inputs; the plain images are made once. The margin is
there because the chosen setting is then used on other prompts, and the PSNR of a few images moves by
several dB from one prompt set to the next (benchmarks/RESULTS.md, "Calibrated to the model").

    fit = diffboost.calibrate(pipe, "fast", prompts=["a red circle", "a blue square"])
    diffboost.save(fit.plugins, "fast-for-my-model.toml")
    diffboost.apply(pipe, fit.plugins)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Sequence

from ..fidelity import pooled_psnr
from .base import Plugin

logger = logging.getLogger("diffboost")

#: the fidelity level (dB PSNR against the plain pipeline) each preset aims at
PRESET_LEVELS = {"safe": 45.0, "fast": 38.0, "turbo": 30.0}


@dataclasses.dataclass(frozen=True)
class Trial:
    """One setting tried: the value, the pooled PSNR (dB) and the share of denoiser calls computed."""

    value: float
    psnr: float
    computed_share: float
    held: bool


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found.

    Attributes:
        plugins: the stack to apply (the input with the tuned field set to ``value``).
        field: the tuned field; ``value`` its chosen setting.
        target_psnr: the level asked for (dB); ``margin_db`` the margin kept above it.
        psnr: PSNR of the chosen setting on the calibration inputs (mean MSE over the images, dB).
        computed_share: denoiser calls computed / all calls at the chosen setting (1.0 = nothing saved).
        reached: False when no setting tried held the target (``plugins`` is then the most faithful
            one tried, and a warning was logged).
        trials: every setting tried, in order.
        pipeline_calls: pipeline calls the calibration made (plain + accelerated, every stack).
        alternatives: the fits of the other stacks tried (``calibrate(..., alternatives=...)``).
    """

    plugins: list[Plugin]
    field: str
    value: float
    target_psnr: float
    margin_db: float
    psnr: float
    computed_share: float
    reached: bool
    trials: tuple[Trial, ...]
    pipeline_calls: int
    alternatives: tuple["Calibration", ...] = ()

    @property
    def knob(self) -> str:
        """``Plugin.field`` of the tuned plugin."""
        owner = next((type(p).__name__ for p in self.plugins if p.tunable_field() == self.field), "?")
        return f"{owner}.{self.field}"

    def summary(self) -> str:
        tried = ", ".join(f"{t.value:g}: {t.psnr:.1f} dB" for t in self.trials)
        verdict = "" if self.reached else " (target NOT reached)"
        text = (f"{self.knob}={self.value:g}: {self.psnr:.1f} dB (target {self.target_psnr:g} + "
                f"{self.margin_db:g} dB margin){verdict}, {self.computed_share:.0%} of the denoiser calls "
                f"computed; tried {tried}")
        for alt in self.alternatives:
            state = "" if alt.reached else ", target not reached"
            text += (f"; also fitted: {alt.knob}={alt.value:g}, {alt.psnr:.1f} dB, {alt.computed_share:.0%} "
                     f"computed{state}")
        return text


def _stack_and_target(plugins: Any, target_psnr: float | None) -> tuple[list[Plugin], float]:
    from .api import _as_plugins

    if target_psnr is None:
        if isinstance(plugins, str) and plugins in PRESET_LEVELS:
            target_psnr = PRESET_LEVELS[plugins]
        else:
            raise ValueError("calibrate needs target_psnr (dB) unless the plugins are a preset name "
                             f"({', '.join(f'{k}: {v:g} dB' for k, v in PRESET_LEVELS.items())})")
    if isinstance(target_psnr, bool) or not isinstance(target_psnr, (int, float)) or not 10 <= target_psnr <= 100:
        raise ValueError(f"target_psnr must be a number of dB in [10, 100], got {target_psnr!r}")
    return _as_plugins((plugins,)), float(target_psnr)


def _tuned(stack: list[Plugin]) -> tuple[int, str]:
    """The index of the one plugin with a knob to tune, and the knob's name."""
    tunable = [(i, p.tunable_field()) for i, p in enumerate(stack) if p.tunable_field()]
    if len(tunable) != 1:
        names = [type(p).__name__ for p in stack]
        which = "none of them has" if not tunable else "more than one has"
        raise ValueError(
            f"calibrate tunes one plugin's strength field; in the stack {names} {which} one. Tunable: "
            "EasyCache.threshold, SADA.tolerance (criterion='curvature'), AdaptiveBlockCache.threshold, "
            "ErrorControlledCache.tolerance, TaylorSeer.interval"
        )
    return tunable[0]  # type: ignore[return-value]


def _check_inputs(prompts: Any, seeds: Any, margin_db: Any, max_trials: Any) -> tuple[list[str], list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("calibrate needs prompts: a non-empty list of strings like the ones you will generate")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"calibration prompts must be non-empty strings, got {bad[0]!r}")
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = list(seeds)
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"calibration seed {seed!r} is out of range; allowed: integers 0 <= seed < 2**63")
    if not seeds:
        raise ValueError("calibrate needs at least one seed")
    if isinstance(margin_db, bool) or not isinstance(margin_db, (int, float)) or not 0 <= margin_db <= 20:
        raise ValueError(f"margin_db must be a number of dB in [0, 20], got {margin_db!r}")
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or not 2 <= max_trials <= 50:
        raise ValueError(f"max_trials must be an integer in [2, 50], got {max_trials!r}")
    return list(prompts), seeds


def _run(pipe: Any, prompts: list[str], seeds: list[int], call_kwargs: dict[str, Any]) -> list[Any]:
    import torch

    images: list[Any] = []
    for prompt in prompts:
        for seed in seeds:
            out = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **call_kwargs)
            images.extend(out.images)
    return images


def _holds(db: float, target: float, margin_db: float) -> bool:
    """A setting holds when its PSNR is at least the target plus the margin."""
    return db >= target + margin_db


def _step(value: float, up: bool, integer: bool) -> float:
    if integer:
        return value * 2 if up else max(1, value // 2)
    return value * 2 if up else value / 2


def _between(lo: float, hi: float, integer: bool) -> float:
    """The next value to try between ``lo`` and ``hi``: the midpoint for integers, else the geometric
    mean to 2 significant digits (finer steps change little: the search stops when it rounds onto
    an end)."""
    if integer:
        return float((int(lo) + int(hi)) // 2)
    mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
    return float(f"{mid:.2g}")


def search(trial: Callable[[float], Trial], start: float, integer: bool, max_trials: int,
           check: Callable[[float], Any]) -> tuple[Trial, bool]:
    """The strongest setting that holds, in at most ``max_trials`` calls of ``trial``.

    From ``start`` double while the trials hold (halve while they miss) until the answer changes,
    then bisect (geometric mean; the midpoint for integers) between the strongest value that held
    and the weakest that missed. Going up stops early when a trial computes the same share of calls
    as the one before (the plugin's other limits bind: a larger value changes nothing). ``check(v)``
    raises ``ValueError`` for a value outside the field's range (the search stops there). Returns the
    trial that held with the fewest calls computed (the smaller value on a tie) and True, or the
    most faithful trial and False when none held.
    """
    trials: list[Trial] = []
    held: float | None = None  # the strongest value that held, the weakest that missed
    missed: float | None = None

    def run(value: float) -> Trial:
        nonlocal held, missed
        t = trial(value)
        trials.append(t)
        if t.held:
            held = value if held is None else max(held, value)
        else:
            missed = value if missed is None else min(missed, value)
        return t

    first = last = run(start)
    value = start
    while len(trials) < max_trials and (held is None or missed is None):
        nxt = _step(value, first.held, integer)
        if nxt == value or (not first.held and not integer and nxt < start / 2**12):
            break
        try:
            check(nxt)
        except ValueError:  # past the field's allowed range
            break
        value, before = nxt, last
        last = run(value)
        if first.held and last.held and last.computed_share >= before.computed_share:
            break  # saturated: larger values compute the same calls
    while held is not None and missed is not None and len(trials) < max_trials:
        if not integer and max(held, missed) <= 1.1 * min(held, missed):
            break  # within 10%: closer steps change less than the prompts do
        mid = _between(held, missed, integer)
        if mid in (held, missed) or not min(held, missed) < mid < max(held, missed):
            break
        run(mid)
    good = [t for t in trials if t.held]
    if good:
        return min(good, key=lambda t: (t.computed_share, t.value)), True
    return max(trials, key=lambda t: (t.psnr, -t.value)), False


def calibrate(
    pipe: Any,
    plugins: Any,
    *,
    prompts: Sequence[str],
    target_psnr: float | None = None,
    seeds: Sequence[int] | int = (0,),
    margin_db: float = 2.0,
    max_trials: int = 8,
    alternatives: Sequence[Any] = (),
    **call_kwargs: Any,
) -> Calibration:
    """Tune the speed knob of ``plugins`` so that ``pipe`` keeps ``target_psnr`` dB on these prompts.

    Args:
        pipe: a Diffusers pipeline, not accelerated (its plain images are the reference).
        plugins: a preset name (its level is the default target), a plugin config or a stack with
            exactly one tunable plugin; its current setting is where the search starts.
        prompts: calibration prompts, like the ones the pipeline will be used for (8 or more;
            the cost is one plain run and up to ``max_trials`` accelerated runs over them).
        target_psnr: dB PSNR of the accelerated images against the plain ones (mean MSE over the
            images); default the preset's level (safe 45, fast 38, turbo 30).
        seeds: generator seeds, each prompt runs once per seed. Default (0,).
        margin_db: dB kept above the target on the calibration inputs, for other prompts. Default 2
            (with 1 dB and 4 prompts, settings fitted on our Flux model missed the target by 2-5 dB
            on a new prompt set: the mean over few images is dominated by the hardest one).
        max_trials: most accelerated runs per stack (>= 2). Default 8.
        alternatives: other stacks (configs, preset names or lists, each with one tunable plugin)
            fitted to the same target on the same plain images; the fit computing the fewest
            denoiser calls that reaches the target is returned (the others in ``.alternatives``). A
            stack the pipeline refuses is skipped and logged. Default none.
        **call_kwargs: passed to every pipeline call (``num_inference_steps``, ``height``, ...): use
            the settings you will generate with, the fit depends on them.

    Returns:
        a :class:`Calibration` (``.plugins`` to apply or save, ``.summary()`` to print).
    """
    from .adapters import UnsupportedPipelineError
    from .api import _HANDLE_ATTR

    stack, target = _stack_and_target(plugins, target_psnr)
    if isinstance(alternatives, (str, Plugin)):
        alternatives = [alternatives]
    others = [_stack_and_target(alt, target)[0] for alt in alternatives]
    prompts_, seeds_ = _check_inputs(prompts, seeds, margin_db, max_trials)
    if getattr(pipe, _HANDLE_ATTR, None) is not None:
        raise ValueError(f"{type(pipe).__name__} is already accelerated; call diffboost.remove(pipe) before calibrating")
    starts = [_start(s) for s in [stack, *others]]  # bad stacks fail here, before any pipeline call
    plain = _run(pipe, prompts_, seeds_, call_kwargs)
    calls = [len(plain)]
    fits = []
    for i, (candidate, start) in enumerate(zip([stack, *others], starts)):
        try:
            fits.append(_fit(pipe, candidate, start, plain, prompts_, seeds_, target, margin_db, max_trials,
                             call_kwargs, calls))
        except UnsupportedPipelineError as err:
            if i == 0:
                raise
            logger.info("calibrate: skipping the alternative %s: %s", candidate, err)
    reached = [f for f in fits if f.reached]
    best = min(reached, key=lambda f: f.computed_share) if reached else fits[0]
    return dataclasses.replace(best, pipeline_calls=calls[0], alternatives=tuple(f for f in fits if f is not best))


def _start(stack: list[Plugin]) -> tuple[int, str, float, bool]:
    """The tuned plugin's index and field, the search's start and whether the field is an integer."""
    index, field = _tuned(stack)
    start = getattr(stack[index], field)
    integer = isinstance(start, int)
    if not start > 0:
        raise ValueError(f"{type(stack[index]).__name__}.{field}={start!r} never accelerates; start the search "
                         "from a value > 0 (e.g. the plugin's default)")
    if integer and start == 1:
        start = 2  # interval 1 computes every step
    _with_value(stack, index, field, integer, start)  # a bad start fails here
    return index, field, float(start), integer


def _with_value(stack: list[Plugin], index: int, field: str, integer: bool, value: float) -> list[Plugin]:
    cfg = dataclasses.replace(stack[index], **{field: int(value) if integer else float(value)})
    return [*stack[:index], cfg, *stack[index + 1:]]


def _fit(pipe: Any, stack: list[Plugin], start: tuple[int, str, float, bool], plain: list[Any], prompts: list[str],
         seeds: list[int], target: float, margin_db: float, max_trials: int, call_kwargs: dict[str, Any],
         calls: list[int]) -> Calibration:
    """Search one stack's strength field (``calls[0]`` counts the pipeline calls made)."""
    from .api import accelerated

    index, field, first, integer = start
    with_value = functools.partial(_with_value, stack, index, field, integer)
    trials: list[Trial] = []

    def trial(value: float) -> Trial:
        with accelerated(pipe, with_value(value)) as handle:
            computed = total = 0
            images = []
            for prompt in prompts:
                for seed in seeds:
                    images.extend(_run(pipe, [prompt], [seed], call_kwargs))
                    summary = handle.describe().get("summary") or {}
                    computed += summary.get("computed", 0)
                    total += summary.get("denoiser_calls", 0)
        calls[0] += len(images)
        db = pooled_psnr(images, plain)[0]
        t = Trial(float(value), db, computed / total if total else 1.0, _holds(db, target, margin_db))
        trials.append(t)
        logger.info("calibrate %s.%s=%g: %.2f dB, %.0f%% of the denoiser calls computed (%s)", type(stack[index]).__name__,
                    field, value, db, 100 * t.computed_share, "holds" if t.held else "misses")
        return t

    best, reached = search(trial, first, integer, max_trials, with_value)
    if not reached:
        logger.warning("calibrate: no %s tried kept %g dB + %g dB margin (the most faithful, %s=%g, kept %.1f dB); "
                       "use a weaker plugin or a lower target", field, target, margin_db, field, best.value, best.psnr)
    return Calibration(
        plugins=with_value(best.value), field=field, value=int(best.value) if integer else best.value,
        target_psnr=target, margin_db=float(margin_db), psnr=best.psnr, computed_share=best.computed_share,
        reached=reached, trials=tuple(trials), pipeline_calls=calls[0],
    )
