"""The Taylor predictor's math: divided differences recover polynomials exactly."""

import math

import pytest
import torch

from diffboost.caches.taylor import TaylorFactors, flatten, unflatten


def _poly(step: float, coeffs: list[float]) -> torch.Tensor:
    return torch.full((2, 3), sum(c * step**i for i, c in enumerate(coeffs)), dtype=torch.float64)


def _paper_forecast(values: list[float], d: int, k: int, order: int) -> float:
    """TaylorSeer's forecast written out independently of the recursion: on uniformly spaced full
    steps (spacing d) the i-th factor is the i-th backward difference over d**i,
    sum_j (-1)**j C(i, j) F(s_n - j d) / d**i, and the forecast is sum_i factor_i k**i / i!."""
    newest_first = values[::-1]
    total = 0.0
    for i in range(order + 1):
        diff = sum((-1) ** j * math.comb(i, j) * newest_first[j] for j in range(i + 1))
        total += diff / d**i * k**i / math.factorial(i)
    return total


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_forecast_matches_the_papers_formula_for_every_order(order, d):
    # a feature that is no polynomial of low degree, so that every factor contributes
    values = [math.exp(0.3 * n) + (-1) ** n * 0.1 * n for n in range(order + 3)]
    f = TaylorFactors(order)
    for n, v in enumerate(values):
        f.update(torch.tensor([v], dtype=torch.float64), n * d)
    last = f.last_step
    assert last == (len(values) - 1) * d and f.available_order() == order
    window = values[-(order + 1):]
    for k in (1, 2, 3, 5):
        expected = _paper_forecast(window, d, k, order)
        assert f.forecast(last + k).item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (order, d, k)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_forecast_is_exact_for_polynomials_it_can_represent(order):
    # backward differences over d**i are exact derivatives for polynomials of degree <= 1, so every
    # order >= 1 forecasts a line exactly (its higher factors vanish); order 0 keeps a constant
    coeffs = [0.7] if order == 0 else [0.7, -0.45]
    f = TaylorFactors(order)
    for s in range(0, 3 * (order + 2), 3):
        f.update(_poly(s, coeffs), s)
    last = f.last_step
    for k in (0, 1, 2, 4, 7):
        torch.testing.assert_close(f.forecast(last + k), _poly(last + k, coeffs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_higher_factors_of_a_polynomial_of_that_degree(order):
    # F(s) = s**order: the order-th backward difference over d**order is order! for any spacing d,
    # so the last factor is exactly the order-th derivative and the forecast's top term is k**order
    for d in (1, 2):
        f = TaylorFactors(order)
        for n in range(order + 1):
            f.update(torch.tensor([float((n * d) ** order)], dtype=torch.float64), n * d)
        top = f.factors()[0][order]
        assert top.item() == pytest.approx(math.factorial(order))
        lower = sum(f.factors()[0][i].item() * 2**i / math.factorial(i) for i in range(order))
        assert f.forecast(f.last_step + 2).item() == pytest.approx(lower + 2**order)


def test_non_uniform_spacing_uses_the_latest_gap():
    # full steps 0, 1, 3 (gaps 1 then 2): factor_1 = (F3 - F1) / 2,
    # factor_2 = (factor_1(3) - factor_1(1)) / 2 with factor_1(1) = (F1 - F0) / 1
    f = TaylorFactors(2)
    for s, v in ((0, 1.0), (1, 2.0), (3, 7.0)):
        f.update(torch.tensor([v], dtype=torch.float64), s)
    f1 = (7.0 - 2.0) / 2
    f2 = (f1 - (2.0 - 1.0) / 1) / 2
    rows = f.factors()[0]
    assert [r.item() for r in rows] == pytest.approx([7.0, f1, f2])
    assert f.forecast(5).item() == pytest.approx(7.0 + f1 * 2 + f2 * 4 / 2)


def test_history_keeps_order_plus_one_observations_and_replaces_a_repeated_step():
    f = TaylorFactors(2)
    for s in range(6):
        f.update(torch.tensor([float(s)]), s)
    assert [s for s, _ in f.history] == [3, 4, 5] and f.available_order() == 2
    f.update(torch.tensor([50.0]), 5)  # the same step again replaces its observation
    assert [s for s, _ in f.history] == [3, 4, 5]
    assert f.latest().item() == 50.0
    assert f.factors()[0][1].item() == 46.0  # (50 - 4) / 1
    f.clear()
    assert not f.ready and f.last_step is None and f.spec is None


def test_order_zero_and_k_zero_return_the_last_observation():
    f = TaylorFactors(0)
    f.update(torch.tensor([1.0]), 0)
    f.update(torch.tensor([4.0]), 2)
    assert f.available_order() == 0 and f.forecast(9).item() == 4.0
    g = TaylorFactors(1)
    g.update(torch.tensor([1.0]), 0)
    g.update(torch.tensor([4.0]), 2)
    assert g.forecast(2).item() == 4.0 and g.forecast(3).item() == 5.5


def test_history_is_detached_from_autograd():
    f = TaylorFactors(1)
    x = torch.ones(2, requires_grad=True)
    f.update(x * 2, 0)
    assert not f.history[-1][1][0].requires_grad


def test_flat_tuples_take_the_fast_path():
    a, b = torch.ones(1), torch.zeros(1)
    for value in ((a, b), (a, None), (None, b)):
        leaves, spec = flatten(value)
        assert type(spec) is tuple and spec[1] == 2 and leaves == list(value)
        assert unflatten(leaves, spec) == value
    leaves, spec = flatten(a)
    assert leaves == [a] and unflatten(leaves, spec) is a
    leaves, spec = flatten((a, {"x": b}))  # nested: the generic pytree
    assert len(leaves) == 2 and type(spec) is not tuple


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
    f.update((7, torch.ones(2), {"a": torch.zeros(1), "n": 3}, None), 0)
    f.update((7, 3 * torch.ones(2), {"a": torch.ones(1), "n": 3}, None), 1)
    out = f.forecast(2)
    assert torch.equal(out[1], 5 * torch.ones(2)) and torch.equal(out[2]["a"], 2 * torch.ones(1))
    assert out[0] == 7 and out[2]["n"] == 3 and out[3] is None
    assert torch.equal(f.latest()[1], 3 * torch.ones(2))


def test_reduced_precision_is_forecast_in_float32_and_returned_in_its_dtype():
    f = TaylorFactors(1)
    f.update(torch.tensor([1.0], dtype=torch.bfloat16), 0)
    f.update(torch.tensor([2.0], dtype=torch.bfloat16), 1)
    out = f.forecast(3)
    assert out.dtype == torch.bfloat16 and out.item() == 4.0
    assert all(r.dtype == torch.float32 for r in f.factors()[0])
    h = TaylorFactors(1)
    h.update(torch.tensor([1.0], dtype=torch.float64), 0)
    assert h.factors()[0][0].dtype == torch.float64


def test_shape_change_restarts_the_series():
    f = TaylorFactors(2)
    f.update(torch.ones(2), 0)
    f.update(torch.ones(3), 1)
    assert f.available_order() == 0
    assert torch.equal(f.forecast(2), torch.ones(3))
    f.update(torch.ones(3), 2)
    f.update((torch.ones(3), torch.ones(3)), 3)  # a different structure restarts it too
    assert f.available_order() == 0
    f.update((torch.ones(3), 2 * torch.ones(3)), 4)
    assert f.available_order() == 1


def test_forecast_returns_fresh_tensors():
    f = TaylorFactors(0)
    x = torch.ones(2)
    f.update(x, 0)
    out = f.forecast(1)
    out.add_(1)
    assert torch.equal(f.forecast(1), torch.ones(2))


def test_an_optional_leaf_that_appears_keeps_the_series():
    # a flat tuple whose second entry is None at first and a tensor later has the same structure;
    # only tensor pairs are compared by shape
    f = TaylorFactors(1)
    f.update((torch.ones(2), None), 0)
    f.update((3 * torch.ones(2), torch.zeros(1)), 1)
    assert f.available_order() == 1
    assert torch.equal(f.forecast(2)[0], 5 * torch.ones(2))
