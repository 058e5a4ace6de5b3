"""Taylor forecasting of a feature across denoising steps (TaylorSeer's predictor).

On every *full* step s the feature F(s) is observed and the factors are refreshed by recursive
divided differences on the step index:

    factor_0 = F(s)
    factor_{i+1} = (factor_i(s) - factor_i(s_prev)) / d,      d = s - s_prev

so factor_i approximates the i-th derivative dF/ds^i. A step k steps after the last full one is
forecast by the truncated Taylor series

    F_hat(s + k) = sum_i factor_i * k^i / i!

The factors of any nested output (tensor, tuple, list, ModelOutput) are kept leaf by leaf;
non-tensor leaves are returned unchanged. Arithmetic runs in float32 for reduced-precision
features and the forecast is cast back to the feature's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree


class TaylorFactors:
    """Taylor factors of one (possibly nested) feature. ``order`` is TaylorSeer's O (0-4)."""

    __slots__ = ("order", "factors", "last_step", "spec", "dtypes", "updates")

    def __init__(self, order: int):
        self.order = order
        self.factors: list[list[torch.Tensor | Any]] = []  # per leaf: [f0, f1, ...]
        self.last_step: int | None = None
        self.spec = None
        self.dtypes: list[torch.dtype | None] = []
        self.updates = 0

    @property
    def ready(self) -> bool:
        return self.last_step is not None

    def available_order(self) -> int:
        return min((len(f) for f in self.factors if isinstance(f, list)), default=1) - 1

    def update(self, value: Any, step: int) -> None:
        leaves, spec = pytree.tree_flatten(value)
        if self.spec is not None and (spec != self.spec or len(leaves) != len(self.factors)):
            self.clear()
        d = None if self.last_step is None else step - self.last_step
        new_factors: list[Any] = []
        dtypes: list[torch.dtype | None] = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                new_factors.append(leaf)
                dtypes.append(None)
                continue
            work = leaf.detach()
            if work.dtype in (torch.float16, torch.bfloat16):
                work = work.float()
            row = [work]
            old = self.factors[i] if (d and self.factors) else None
            if old is not None and isinstance(old, list) and old[0].shape == work.shape:
                for j in range(min(self.order, len(old))):
                    row.append((row[j] - old[j]) / d)
            new_factors.append(row)
            dtypes.append(leaf.dtype)
        self.factors, self.spec, self.dtypes = new_factors, spec, dtypes
        self.last_step = step
        self.updates += 1

    def forecast(self, step: int) -> Any:
        """Forecast the feature at ``step`` (> last full step)."""
        k = step - self.last_step
        leaves = []
        for row, dtype in zip(self.factors, self.dtypes):
            if dtype is None:
                leaves.append(row)
                continue
            # always a fresh tensor: the model may modify what we return in place
            out = row[0].clone()
            for i in range(1, len(row) if k != 0 else 1):
                out.add_(row[i], alpha=(k**i) / math.factorial(i))
            leaves.append(out if out.dtype == dtype else out.to(dtype))
        return pytree.tree_unflatten(leaves, self.spec)

    def latest(self) -> Any:
        """The last observed value (order-0 reuse)."""
        leaves = [row if dt is None else (row[0] if row[0].dtype == dt else row[0].to(dt)) for row, dt in zip(self.factors, self.dtypes)]
        return pytree.tree_unflatten(leaves, self.spec)

    def clear(self) -> None:
        self.factors, self.spec, self.dtypes, self.last_step = [], None, [], None
