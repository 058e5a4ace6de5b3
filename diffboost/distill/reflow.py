"""Rectified-flow reflow with few-step regression: the math, in pure functions.

The teacher's ODE maps a noise ``z`` to an image latent ``x0`` (all its steps, with its guidance).
On the straight line between them, ``x_s = (1 - s) * x0 + s * z`` for ``s`` in [0, 1], the velocity
is the same everywhere: ``v = z - x0``. A student trained to predict ``v`` at the noise levels an
N-step Euler sampler visits (``s = 1, (N-1)/N, ..., 1/N``) reproduces the teacher's endpoint in N
steps, and in one step from ``s = 1``: ``x0 = z - v``. One set of weights serves 1..N steps: the
schedule is the plain linear one, ``sigmas = linspace(1, 1/N, N)`` (diffusers'
``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` and no dynamic shifting gives exactly that).
"""

from __future__ import annotations

import torch


def step_sigmas(steps: int) -> list[float]:
    """The noise levels an Euler sampler with the linear schedule visits in ``steps`` steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [1.0 - i / steps for i in range(steps)]


def training_sigmas(max_steps: int) -> tuple[list[float], list[float]]:
    """Every noise level a 1..``max_steps``-step sampler visits, and a weight for each: half the
    mass on s = 1 (the one-step case, the hardest), the other half over the other levels in
    proportion to how often the step counts 2..``max_steps`` visit them."""
    levels: dict[float, list] = {}  # rounded level -> [exact level, visits weighted per step count]
    for n in range(2, max_steps + 1):
        for s in step_sigmas(n)[1:]:
            entry = levels.setdefault(round(s, 9), [s, 0.0])
            entry[1] += 1.0 / (n - 1)
    if not levels:
        return [1.0], [1.0]
    total = sum(v for _, v in levels.values())
    ordered = sorted(levels.values(), key=lambda e: -e[0])
    return [1.0] + [s for s, _ in ordered], [0.5] + [0.5 * v / total for _, v in ordered]


def interpolate(z: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The point at noise level ``sigma`` (one per sample) on the line from ``x0`` to ``z``."""
    s = sigma.view(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    return (1 - s) * x0 + s * z


def target_velocity(z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight line (diffusers' flow-matching convention: ``x0 = x_s - s * v``)."""
    return z - x0


def reflow_loss(pred: torch.Tensor, z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a predicted velocity against the straight line's."""
    return torch.nn.functional.mse_loss(pred.float(), target_velocity(z, x0).float())


def euler(velocity, z: torch.Tensor, steps: int) -> torch.Tensor:
    """Sample with ``velocity(x, sigma)`` in ``steps`` Euler steps of the linear schedule (what the
    pipeline does with the exported scheduler); used by the tests and the trainer's validation."""
    x = z
    sig = step_sigmas(steps) + [0.0]
    for s, nxt in zip(sig[:-1], sig[1:]):
        x = x + (nxt - s) * velocity(x, torch.full((z.shape[0],), s))
    return x
