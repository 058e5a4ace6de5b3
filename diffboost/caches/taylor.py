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
features and the forecast is cast back to the feature's dtype. ``update`` and ``forecast`` are
host-side bookkeeping kept out of ``torch.compile`` (Dynamo would otherwise recompile them for every
new k, shape and history length, and hit its recompile limit).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..plugins.pytree import flatten, unflatten
from ..plugins.runtime import compiled_around


@compiled_around("update", "forecast", recursive=True)
class TaylorFactors:
    """Taylor factors of one (possibly nested) feature. ``order`` is TaylorSeer's O (0-4).

    A full step only *records* the feature (no arithmetic, no copy): the last ``order + 1``
    observations are kept, and the divided differences are computed when the first forecast after
    a full step asks for them. Replaying the recursion over that window gives exactly the factors
    of the step-by-step recursion, since factor_i at step n depends on F_n ... F_{n-i} only.
    """

    __slots__ = ("order", "history", "spec", "_factors")

    def __init__(self, order: int):
        self.order = order
        self.history: list[tuple[int, list[Any]]] = []  # (step, leaves), oldest first
        self.spec = None
        self._factors: list[Any] | None = None

    @property
    def ready(self) -> bool:
        return bool(self.history)

    @property
    def last_step(self) -> int | None:
        return self.history[-1][0] if self.history else None

    def available_order(self) -> int:
        return len(self.history) - 1

    def update(self, value: Any, step: int) -> None:
        leaves, spec = flatten(value)
        if self.history and (spec != self.spec or not _same_shapes(leaves, self.history[-1][1])):
            self.history.clear()
        if self.history and self.history[-1][0] == step:
            self.history.pop()
        self.history.append((step, [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]))
        del self.history[: -(self.order + 1)]
        self.spec = spec
        self._factors = None

    def factors(self) -> list[Any]:
        """Per leaf: [f_0, f_1, ...] (float32 for reduced-precision leaves), or the leaf itself."""
        if self._factors is None:
            rows: list[Any] = [None] * len(self.history[0][1])
            prev_step = None
            for step, leaves in self.history:
                d = None if prev_step is None else step - prev_step
                for i, leaf in enumerate(leaves):
                    if not _is_float(leaf):
                        rows[i] = leaf
                        continue
                    work = leaf.float() if leaf.dtype in (torch.float16, torch.bfloat16) else leaf
                    row = [work]
                    old = rows[i] if d else None
                    if isinstance(old, list):
                        for j in range(min(self.order, len(old))):
                            row.append((row[j] - old[j]) / d)
                    rows[i] = row
                prev_step = step
            self._factors = rows
        return self._factors

    def forecast(self, step: int) -> Any:
        """Forecast the feature at ``step`` (after the last full step)."""
        k = step - self.last_step
        leaves = []
        for row, leaf in zip(self.factors(), self.history[-1][1]):
            if not _is_float(leaf):
                leaves.append(row)
                continue
            # always a fresh tensor: the model may modify what we return in place
            out = row[0].clone()
            for i in range(1, len(row) if k != 0 else 1):
                out.add_(row[i], alpha=(k**i) / math.factorial(i))
            leaves.append(out if out.dtype == leaf.dtype else out.to(leaf.dtype))
        return unflatten(leaves, self.spec)

    def latest(self) -> Any:
        """The last observed value (order-0 reuse)."""
        return unflatten(list(self.history[-1][1]), self.spec)

    def clear(self) -> None:
        self.history.clear()
        self.spec, self._factors = None, None


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _same_shapes(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    return all((x.shape == y.shape) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else True for x, y in zip(a, b))
