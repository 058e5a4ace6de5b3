"""The reflow math: the schedule a student is trained on and sampled with, and the straight-line
targets (an exact oracle velocity must land on the teacher's endpoint in any step count)."""

from __future__ import annotations

import pytest
import torch

from diffboost.distill import reflow


def test_step_sigmas_are_the_linear_euler_schedule():
    assert reflow.step_sigmas(1) == [1.0]
    assert reflow.step_sigmas(2) == [1.0, 0.5]
    assert reflow.step_sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        reflow.step_sigmas(0)


def test_training_sigmas_cover_every_step_count_with_half_the_mass_at_one():
    sig, w = reflow.training_sigmas(4)
    assert sig == [1.0, 0.75, 1 - 1 / 3, 0.5, 1 - 2 / 3, 0.25]
    assert abs(sum(w) - 1) < 1e-9 and w[0] == 0.5 and all(x > 0 for x in w)
    # 0.5 is visited by the 2- and the 4-step sampler: (1 + 1/3) of the 3 step counts' unit weights
    assert abs(w[3] - 0.5 * (1 + 1 / 3) / 3) < 1e-9
    assert reflow.training_sigmas(1) == ([1.0], [1.0])


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_the_straight_line_velocity_reaches_the_endpoint_in_any_step_count(steps):
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    # the oracle knows the pair: at x_s it answers z - x0, which the student is trained to give
    out = reflow.euler(lambda x, s: reflow.target_velocity(z, x0), z, steps)
    assert torch.allclose(out, x0, atol=1e-6)


def test_interpolation_and_loss():
    z, x0 = torch.full((2, 3), 2.0), torch.full((2, 3), 0.5)
    x = reflow.interpolate(z, x0, torch.tensor([1.0, 0.25]))
    assert torch.equal(x[0], z[0]) and torch.allclose(x[1], torch.full((3,), 0.75 * 0.5 + 0.25 * 2.0))
    assert reflow.interpolate(z.bfloat16(), x0.bfloat16(), torch.tensor([0.5, 0.5])).dtype == torch.bfloat16
    assert reflow.reflow_loss(z - x0, z, x0) == 0
    assert torch.isclose(reflow.reflow_loss(torch.zeros(2, 3), z, x0), torch.tensor(2.25))


def test_euler_steps_the_sampler_way():
    """Each step: x <- x + (s_next - s) * v(x, s), v given the current x and a per-sample sigma."""
    seen = []

    def velocity(x, s):
        seen.append(s.clone())
        return x * s.view(-1, 1)

    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = reflow.euler(velocity, z, 2)
    step1 = z + (0.5 - 1.0) * z * 1.0
    assert torch.allclose(out, step1 + (0.0 - 0.5) * step1 * 0.5)
    assert [t.tolist() for t in seen] == [[1.0] * 3, [0.5] * 3]
