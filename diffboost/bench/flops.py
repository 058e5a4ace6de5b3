"""Denoiser FLOPs of one pipeline call, counted with ``torch.utils.flop_counter.FlopCounterMode``.

What is counted: the whole pipeline call runs under one counter, and the bench reports the FLOPs
spent *while a denoiser forward is running* (``transformer``, ``transformer_2``, ``unet``): forward
hooks on the denoiser read the counter's global total on entry and exit. Text encoders and the VAE
cost the same in every configuration and would only dilute the reduction, so they are excluded (the
whole-call total is kept as ``call_flops``). A step that skips the denoiser entirely counts zero;
cache bookkeeping outside matmuls/convolutions/attention (forecasts, residual adds, norms) is not
counted, since FlopCounterMode only counts those ops.

The global-total delta is used instead of FlopCounterMode's per-module table because wrappers such
as cache-dit's re-enter the denoiser's module name and get their FLOPs counted several times there.

On CPU, PyTorch runs scaled-dot-product attention as ``_scaled_dot_product_flash_attention_for_cpu``,
for which FlopCounterMode has no formula; :func:`cpu_sdpa_flops` adds one (QK^T and PV, 2 FLOPs per
multiply-add, the rule torch uses for its CUDA attention kernels).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

_DENOISER_ATTRS = ("transformer", "transformer_2", "unet")


def cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``softmax(q k^T) v`` for (..., S, D) shapes: QK^T and PV, 2 FLOPs per multiply-add."""
    *batch, sq, d = query_shape
    sk, dv = key_shape[-2], value_shape[-1]
    b = math.prod(batch)
    return 2 * b * sq * sk * d + 2 * b * sq * sk * dv


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: cpu_sdpa_flops} if op is not None else {}


def denoisers(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's denoiser modules (distinct objects)."""
    found: list[torch.nn.Module] = []
    for attr in _DENOISER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module) and all(module is not m for m in found):
            found.append(module)
    return found


class _DenoiserMeter:
    """Accumulates the counter's global-total growth during (outermost) denoiser forwards."""

    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.depth = 0
        self.start = 0
        self.flops = 0

    def _total(self) -> int:
        return int(sum(self.counter.flop_counts["Global"].values()))

    def enter(self, *_: Any, **__: Any) -> None:
        if self.depth == 0:
            self.start = self._total()
        self.depth += 1

    def leave(self, *_: Any, **__: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.flops += self._total() - self.start


def count_denoiser_flops(pipe: Any, call: Callable[[], Any]) -> tuple[int, int]:
    """Run ``call()`` under FlopCounterMode; return ``(denoiser_flops, whole_call_flops)``."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    meter = _DenoiserMeter(counter)
    handles = []
    for module in denoisers(pipe):
        handles.append(module.register_forward_pre_hook(meter.enter))
        handles.append(module.register_forward_hook(meter.leave, always_call=True))
    try:
        with counter:
            call()
    finally:
        for handle in handles:
            handle.remove()
    return meter.flops, int(sum(counter.get_flop_counts().get("Global", {}).values()))
