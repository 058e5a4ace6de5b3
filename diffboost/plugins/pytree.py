"""Leaves and structure of a module's output (a tensor, a tuple of tensors, or any pytree), with a
fast path for the common cases. Used by the forecasting math and the runtime's finite check."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

_TENSOR = "tensor"
_TUPLE = "tuple"


def flatten(value: Any) -> tuple[list[Any], Any]:
    """Leaves and structure of a module output. Tensors and flat tuples (what blocks, attention and
    feed-forward modules return) take a fast path: torch's generic pytree costs ~20 us per call."""
    if isinstance(value, torch.Tensor):
        return [value], _TENSOR
    if type(value) is tuple and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return list(value), (_TUPLE, len(value))
    return pytree.tree_flatten(value)


def unflatten(leaves: list[Any], spec: Any) -> Any:
    if spec is _TENSOR:
        return leaves[0]
    if type(spec) is tuple and spec[0] is _TUPLE:
        return tuple(leaves)
    return pytree.tree_unflatten(leaves, spec)
