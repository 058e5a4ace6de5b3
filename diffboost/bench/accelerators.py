"""Install / remove each kind of configuration on a pipeline.

Every installer returns a zero-argument ``remove`` callable that restores the pipeline, or raises
:class:`Unavailable` with the reason the configuration cannot run here (rival not installed, no
hookable denoiser, calibration impossible, ...). The runner records the reason and moves on.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
from typing import Any, Callable, Iterator

import torch

import diffboost

from .configs import BenchConfig, build_plugins

logger = logging.getLogger(__name__)

Remover = Callable[[], None]
#: Runs the pipeline once with the benchmark's first prompt/seed (used for MagCache calibration).
Probe = Callable[[], Any]


class Unavailable(RuntimeError):
    """A configuration cannot run on this pipeline / machine; the message is the recorded reason."""


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (``transformer`` or ``unet``)."""
    for attr in ("transformer", "unet"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise Unavailable(f"{type(pipe).__name__} has no 'transformer' or 'unet' component")


def install(config: BenchConfig, pipe: Any, steps: int, probe: Probe, state: dict[str, Any]) -> Remover:
    """Install ``config`` on ``pipe``; ``state`` keeps per-config data between repeats, and
    ``state["workload"]`` (when given) facts of the plain workload shared by every config."""
    if config.kind == "baseline":
        return lambda: None
    if config.kind == "diffboost":
        handle = diffboost.apply(pipe, *build_plugins(config))
        return handle.remove
    if config.kind == "diffusers":
        return _install_diffusers(config, pipe, steps, probe, state)
    if config.kind == "cache-dit":
        return _install_cache_dit(config, pipe, steps, probe, state)
    if config.kind == "tomesd":
        return _install_tomesd(config, pipe)
    if config.kind == "deepcache":
        return _install_deepcache(config, pipe)
    raise Unavailable(f"unknown kind {config.kind!r}")


# ----------------------------------------------------------------------------------------------
# diffusers built-in caches
# ----------------------------------------------------------------------------------------------


def _with_dtypes(options: dict[str, Any]) -> dict[str, Any]:
    """TOML cannot hold a ``torch.dtype``: ``*_dtype`` options given as strings ("float32") are converted."""
    out = dict(options)
    for key, value in options.items():
        if key.endswith("dtype") and isinstance(value, str):
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise Unavailable(f"option {key}={value!r} is not a torch dtype name")
            out[key] = dtype
    return out


def _enable(denoiser: torch.nn.Module, cache_config: Any) -> Remover:
    if not hasattr(denoiser, "enable_cache"):
        raise Unavailable(f"{type(denoiser).__name__} has no enable_cache (diffusers CacheMixin)")
    try:
        denoiser.enable_cache(cache_config)
    except Exception as exc:  # unsupported denoiser / config
        raise Unavailable(f"enable_cache failed: {type(exc).__name__}: {exc}") from exc
    return denoiser.disable_cache


def _install_diffusers(config: BenchConfig, pipe: Any, steps: int, probe: Probe, state: dict[str, Any]) -> Remover:
    import diffusers

    denoiser = denoiser_of(pipe)
    options = _with_dtypes(config.options)
    cls = getattr(diffusers, f"{config.cache}Config", None)
    if cls is None:
        raise Unavailable(f"diffusers {diffusers.__version__} has no {config.cache}Config")
    if config.cache == "MagCache":
        options.setdefault("num_inference_steps", steps)
        if "mag_ratios" not in options:
            facts = state.setdefault("workload", {})
            if "mag_ratios" not in facts:
                facts["mag_ratios"] = calibrate_mag_ratios(pipe, steps, probe)
            options["mag_ratios"] = facts["mag_ratios"]
    try:
        cache_config = cls(**options)
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"{cls.__name__}({options}) is invalid: {exc}") from exc
    return _enable(denoiser, cache_config)


class _RatioCatcher(logging.Handler):
    """Catches the ratios diffusers' MagCache reports at the end of a calibration run.

    diffusers prints them (after a "Calibration Complete" line) and logs them at INFO level; both
    channels are watched, the printed list being the primary source.
    """

    PREFIX = "MagCache Calibration Results:"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ratios: list[float] | None = None
        self.stdout = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.ratios = _parse_ratios(message[len(self.PREFIX):])

    def result(self) -> list[float] | None:
        printed = [line for line in self.stdout.getvalue().splitlines() if line.strip().startswith("[")]
        for line in reversed(printed):
            ratios = _parse_ratios(line)
            if ratios:
                return ratios
        return self.ratios


def _parse_ratios(text: str) -> list[float] | None:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) for x in value):
        return [float(x) for x in value]
    return None


@contextlib.contextmanager
def _catch_ratios() -> Iterator[_RatioCatcher]:
    mag_logger = logging.getLogger("diffusers.hooks.mag_cache")
    catcher, level = _RatioCatcher(), mag_logger.level
    mag_logger.addHandler(catcher)
    mag_logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(catcher.stdout):
            yield catcher
    finally:
        mag_logger.removeHandler(catcher)
        mag_logger.setLevel(level)


def calibrate_mag_ratios(pipe: Any, steps: int, probe: Probe) -> list[float]:
    """Calibrate MagCache's per-step magnitude ratios on this model with diffusers' own calibration mode.

    One unaccelerated run (``MagCacheConfig(calibrate=True)`` never skips) on the benchmark's first
    prompt and seed; the ratios diffusers reports at the end of the run are reused for every repeat.
    """
    from diffusers import MagCacheConfig

    remove = _enable(denoiser_of(pipe), MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with _catch_ratios() as catcher:
            probe()
    finally:
        remove()
    ratios = catcher.result()
    if not ratios or len(ratios) != steps:
        got = "nothing" if not ratios else f"{len(ratios)} ratios"
        raise Unavailable(f"MagCache calibration produced {got}, expected {steps} ratios")
    logger.info("MagCache calibrated on this model: %d ratios, mean %.4f", steps, sum(ratios) / steps)
    return ratios


# ----------------------------------------------------------------------------------------------
# cache-dit
# ----------------------------------------------------------------------------------------------


#: cache-dit calibrator types (``calibrator = { type = "dmd", ... }`` in a bench config) -> config class
CALIBRATORS = {"taylorseer": "TaylorSeerCalibratorConfig", "dmd": "DMDCalibratorConfig", "foca": "FoCaCalibratorConfig"}


def cache_dit_status() -> tuple[Any | None, str]:
    """``(module, "")`` when ``import cache_dit`` works, else ``(None, reason)``."""
    try:
        import cache_dit
    except ImportError as exc:
        return None, f"cache-dit not installed ({exc}); pip install cache-dit"
    except Exception as exc:  # broken install
        return None, f"cache-dit import failed: {type(exc).__name__}: {exc}"
    for name in list(logging.root.manager.loggerDict):
        if name.lower().startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)  # its INFO tables flood the bench log
    return cache_dit, ""


def denoiser_calls_per_step(pipe: Any, steps: int, probe: Probe) -> float:
    """Denoiser forward calls per step in one probe call (2.0 for CFG run as two separate passes)."""
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = denoiser_of(pipe).register_forward_pre_hook(count)
    try:
        probe()
    finally:
        handle.remove()
    return calls / max(steps, 1)


def _install_cache_dit(config: BenchConfig, pipe: Any, steps: int, probe: Probe, state: dict[str, Any]) -> Remover:
    """Install cache-dit on a deep copy of the denoiser, swapped into the pipeline.

    cache-dit's ``disable_cache`` does not fully restore the denoiser (Flux: patched ``forward`` of
    the transformer and its blocks, hook registries and block state that break diffusers'
    FirstBlockCache afterwards), so it never touches the original module: ``remove`` puts the
    original back. Costs one extra copy of the denoiser's weights while a cache-dit config runs.

    When the options leave ``enable_separate_cfg`` unset and the workload calls the denoiser twice
    per step (true CFG as separate passes, e.g. Flux with ``true_cfg_scale``), it is turned on: with
    one shared cache the cond and uncond residuals differ by far more than any threshold and
    cache-dit never skips (measured: FLOPs reduction 1.00 on the Flux reference model). Set it
    explicitly to override. The calls are counted in one extra plain call, once per bench run
    (``state["workload"]`` is shared by all configs).
    """
    cache_dit, reason = cache_dit_status()
    if cache_dit is None:
        raise Unavailable(reason)
    options = dict(config.options)
    if "enable_separate_cfg" not in options:
        facts = state.setdefault("workload", {})
        if "calls_per_step" not in facts:
            facts["calls_per_step"] = denoiser_calls_per_step(pipe, steps, probe)
        if facts["calls_per_step"] >= 2:
            options["enable_separate_cfg"] = True
            if "auto_note" not in state:
                state["auto_note"] = "enable_separate_cfg=True (auto: separate-pass CFG)"
                logger.info(
                    "%s: %.0f denoiser calls per step (separate-pass CFG): enable_separate_cfg=True",
                    config.name,
                    facts["calls_per_step"],
                )
    try:
        cache_config = cache_dit.DBCacheConfig(**options)
        calibrator = None
        if config.calibrator is not None:
            kwargs = dict(config.calibrator)
            kind = kwargs.pop("type", "taylorseer")
            cls = getattr(cache_dit, CALIBRATORS.get(kind, ""), None)
            if cls is None:
                raise Unavailable(f"cache-dit {getattr(cache_dit, '__version__', '?')} has no {kind!r} calibrator "
                                  f"(calibrator types: {sorted(CALIBRATORS)})")
            calibrator = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"invalid cache-dit options: {exc}") from exc
    attr = "transformer" if isinstance(getattr(pipe, "transformer", None), torch.nn.Module) else "unet"
    original = getattr(pipe, attr)
    setattr(pipe, attr, copy.deepcopy(original))

    def remove() -> None:
        try:
            cache_dit.disable_cache(pipe)
        finally:
            setattr(pipe, attr, original)

    try:
        cache_dit.enable_cache(pipe, cache_config=cache_config, calibrator_config=calibrator)
    except Exception as exc:
        with contextlib.suppress(Exception):
            remove()
        raise Unavailable(f"cache_dit.enable_cache failed: {type(exc).__name__}: {exc}") from exc
    return remove


# ----------------------------------------------------------------------------------------------
# tomesd
# ----------------------------------------------------------------------------------------------


def _install_tomesd(config: BenchConfig, pipe: Any) -> Remover:
    """tomesd's ``apply_patch`` (UNet pipelines only); ``remove_patch`` restores the blocks."""
    try:
        import tomesd
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        raise Unavailable(f"tomesd not available ({type(exc).__name__}: {exc}); pip install tomesd") from None
    if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        raise Unavailable(f"tomesd patches UNet pipelines only; {type(pipe).__name__} has no unet")
    try:
        tomesd.apply_patch(pipe, **config.options)
    except TypeError as exc:
        raise Unavailable(f"invalid tomesd options: {exc}") from exc
    return lambda: tomesd.remove_patch(pipe)


# ----------------------------------------------------------------------------------------------
# DeepCache
# ----------------------------------------------------------------------------------------------


def _install_deepcache(config: BenchConfig, pipe: Any) -> Remover:
    """DeepCache's ``DeepCacheSDHelper`` (SD/SDXL UNet pipelines): reuses the deep UNet features for
    ``cache_interval - 1`` steps out of every ``cache_interval``; ``disable`` restores the UNet."""
    try:
        from DeepCache import DeepCacheSDHelper
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        raise Unavailable(f"DeepCache not available ({type(exc).__name__}: {exc}); pip install DeepCache") from None
    if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        raise Unavailable(f"DeepCache caches UNet pipelines only; {type(pipe).__name__} has no unet")
    helper = DeepCacheSDHelper(pipe=pipe)
    try:
        helper.set_params(**config.options)
    except TypeError as exc:
        raise Unavailable(f"invalid DeepCache options: {exc}") from exc
    helper.enable()
    return helper.disable
