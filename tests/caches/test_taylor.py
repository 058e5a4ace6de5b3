"""The Taylor predictor's math: divided differences recover polynomials exactly."""

import math

import pytest
import torch

from diffboost.caches.taylor import TaylorFactors


def _poly(step: float, coeffs: list[float]) -> torch.Tensor:
    return torch.full((2, 3), sum(c * step**i for i, c in enumerate(coeffs)), dtype=torch.float64)


@pytest.mark.parametrize("order, coeffs", [(0, [2.0]), (1, [1.0, -0.5]), (2, [0.3, 0.2, -0.1])])
def test_forecast_is_exact_for_polynomials_of_its_order_on_uniform_steps(order, coeffs):
    f = TaylorFactors(order)
    for s in range(0, 3 * (order + 1), 3):  # full steps every 3 steps
        f.update(_poly(s, coeffs), s)
    last = f.last_step
    for k in (1, 2):
        if order <= 1:  # divided differences are exact derivatives only up to first order
            torch.testing.assert_close(f.forecast(last + k), _poly(last + k, coeffs))
    assert f.available_order() == order


def test_second_order_matches_backward_difference_formula():
    f = TaylorFactors(2)
    values = {0: 1.0, 2: 3.0, 4: 9.0}
    for s, v in values.items():
        f.update(torch.tensor([v]), s)
    d1 = (9.0 - 3.0) / 2
    d2 = ((9.0 - 3.0) / 2 - (3.0 - 1.0) / 2) / 2
    k = 1
    expected = 9.0 + d1 * k + d2 * k**2 / math.factorial(2)
    assert f.forecast(5).item() == pytest.approx(expected)


def test_nested_outputs_and_non_tensor_leaves_are_kept():
    f = TaylorFactors(1)
    f.update((torch.ones(2), {"a": torch.zeros(1), "n": 3}, None), 0)
    f.update((3 * torch.ones(2), {"a": torch.ones(1), "n": 3}, None), 1)
    out = f.forecast(2)
    assert torch.equal(out[0], 5 * torch.ones(2)) and torch.equal(out[1]["a"], 2 * torch.ones(1))
    assert out[1]["n"] == 3 and out[2] is None


def test_reduced_precision_is_forecast_in_float32_and_returned_in_its_dtype():
    f = TaylorFactors(1)
    f.update(torch.tensor([1.0], dtype=torch.bfloat16), 0)
    f.update(torch.tensor([2.0], dtype=torch.bfloat16), 1)
    out = f.forecast(3)
    assert out.dtype == torch.bfloat16 and out.item() == 4.0


def test_shape_change_restarts_the_series():
    f = TaylorFactors(2)
    f.update(torch.ones(2), 0)
    f.update(torch.ones(3), 1)
    assert f.available_order() == 0
    assert torch.equal(f.forecast(2), torch.ones(3))


def test_forecast_returns_fresh_tensors():
    f = TaylorFactors(0)
    x = torch.ones(2)
    f.update(x, 0)
    out = f.forecast(1)
    out.add_(1)
    assert torch.equal(f.forecast(1), torch.ones(2))
