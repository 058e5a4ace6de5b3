"""DMD2's math (the direction, its normalisation, the surrogate loss's gradient, guidance) and a
tiny DMD run: it trains both networks, resumes bit-identically, and can start from a reflow student."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffboost.distill import dmd
from diffboost.distill import trainer as trainer_mod
from factories import distill_tiny, interrupt_at_call, save_flux_teacher


def test_the_direction_points_from_real_to_fake_normalised_per_sample():
    x0 = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2]])
    real = x0 + torch.tensor([[0.05, 0.05, 0.05], [0.1, 0.1, 0.1]])  # mean |x0 - real|: 0.05 and 0.1
    fake = real + torch.tensor([[0.02, 0.0, -0.02], [0.1, 0.0, 0.0]])
    g = dmd.dmd_gradient(x0, real, fake)
    assert torch.allclose(g, torch.tensor([[0.4, 0.0, -0.4], [1.0, 0.0, 0.0]]))
    assert torch.equal(dmd.dmd_gradient(x0, real, real), torch.zeros(2, 3))
    assert torch.isfinite(dmd.dmd_gradient(x0, x0, fake)).all()  # no division by zero


def test_the_surrogate_loss_has_the_direction_as_gradient():
    x0 = torch.randn(2, 3, requires_grad=True)
    direction = torch.randn(2, 3)
    dmd.dmd_loss(x0, direction).backward()
    assert torch.allclose(x0.grad, direction / x0.numel())


def test_noise_clean_prediction_and_guidance_are_consistent():
    x0, n, t = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0.3, 0.9])
    x_t = dmd.noise_to(x0, n, t)
    assert torch.allclose(dmd.clean_prediction(x_t, t, n - x0), x0, atol=1e-6)
    assert torch.equal(dmd.guided(torch.full((2,), 3.0), torch.ones(2), 3.0), torch.full((2,), 7.0))
    assert dmd.noise_to(x0.bfloat16(), n.bfloat16(), t).dtype == torch.bfloat16
    assert dmd.clean_prediction(x_t.bfloat16(), t, n.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(dmd.fake_score_loss(n - x0, x0, n), torch.tensor(0.0))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_flux_teacher(tmp_path_factory.mktemp("dmd") / "flux")


def test_a_dmd_run_trains_both_networks_and_resumes_to_the_same_weights(teacher, tmp_path, monkeypatch):
    distill_tiny(teacher, tmp_path / "whole", method="dmd", fake_updates=2)
    work = tmp_path / "whole.work"
    fake = load_file(str(work / "fake.safetensors"))
    original = load_file(str(next((teacher / "transformer").glob("*.safetensors"))))
    assert any(not torch.equal(fake[k], original[k]) for k in original)
    assert (work / "fake_optimizer.safetensors").is_file()
    restore = interrupt_at_call(monkeypatch, trainer_mod.dmd, "dmd_loss", 5)
    with pytest.raises(KeyboardInterrupt):
        distill_tiny(teacher, tmp_path / "cut", method="dmd", fake_updates=2)
    restore()
    distill_tiny(teacher, tmp_path / "cut", method="dmd", fake_updates=2)
    for name in ("student", "fake"):
        a = load_file(str(tmp_path / "whole.work" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "cut.work" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_dmd_starts_from_a_reflow_student(teacher, tmp_path):
    distill_tiny(teacher, tmp_path / "reflow", train_steps=3)
    record = distill_tiny(teacher, tmp_path / "dmd", train_steps=1, method="dmd", fake_updates=1,
                          init=str(tmp_path / "reflow"))
    (step, loss, parts), = record["history"]
    assert set(parts) == {"generator", "distribution matching", "reflow regression", "fake score"}
    assert abs(parts["generator"] - (parts["distribution matching"] + 0.25 * parts["reflow regression"])) < 1e-5
    assert record["config"]["init"] == str(tmp_path / "reflow")
    with pytest.raises(FileNotFoundError, match="no transformer"):
        distill_tiny(teacher, tmp_path / "bad", method="dmd", init=str(tmp_path))
