"""diffboost: drop-in acceleration plugins for Hugging Face Diffusers pipelines.

    import diffboost
    handle = diffboost.apply(pipe, diffboost.TaylorSeer(interval=4))   # or diffboost.apply(pipe, "fast")
    image = pipe("a red circle").images[0]
    print(diffboost.describe(pipe))
    diffboost.remove(pipe)

    diffboost.save([diffboost.TaylorSeer(interval=4)], "stack.toml")   # a stack as a file
    diffboost.apply(pipe, diffboost.load("stack.toml"))

    fit = diffboost.calibrate(pipe, "fast", prompts=["a red circle"])  # the preset's 38 dB, on your model
    diffboost.apply(pipe, fit.plugins)
"""

from . import events
from .caches.block_cache import AdaptiveBlockCache, ErrorControlledCache
from .caches.easycache import EasyCache
from .caches.taylorseer import TaylorSeer
from .kernels.attention import QuantizedAttention, SparseAttention
from .plugins.adapters import UnsupportedPipelineError, register_family, supported_families, unregister_family
from .plugins.api import Acceleration, accelerated, apply, call_stats, describe, remove
from .plugins.base import CallStats, Plugin, PluginKind
from .plugins.calibrate import Calibration, calibrate
from .plugins.presets import PRESETS
from .plugins.runtime import ConcurrentCallError
from .plugins.stacking import IncompatiblePluginsError
from .plugins.stacks import StackFileError, load, save
from .samplers.sada import SADA
from .samplers.bottleneck import BottleneckSampling
from .samplers.onestep import OneStep
from .tokens.merging import TokenDownsampling, TokenMerging
from .vlm import Downsample, FastV, HiPrune, HiRED, VisionZip

__version__ = "0.1.0"

__all__ = [
    "VisionZip",
    "HiRED",
    "HiPrune",
    "FastV",
    "Downsample",
    "Acceleration",
    "AdaptiveBlockCache",
    "BottleneckSampling",
    "CallStats",
    "Calibration",
    "ConcurrentCallError",
    "EasyCache",
    "ErrorControlledCache",
    "IncompatiblePluginsError",
    "OneStep",
    "PRESETS",
    "Plugin",
    "PluginKind",
    "QuantizedAttention",
    "SADA",
    "SparseAttention",
    "StackFileError",
    "TaylorSeer",
    "TokenDownsampling",
    "TokenMerging",
    "UnsupportedPipelineError",
    "accelerated",
    "apply",
    "calibrate",
    "call_stats",
    "describe",
    "events",
    "load",
    "register_family",
    "remove",
    "save",
    "supported_families",
    "unregister_family",
]
