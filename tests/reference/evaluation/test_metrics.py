"""Metrics: identities, known values, Fréchet distance, adherence of the shipped evaluator."""

import numpy as np
import pytest
import torch

from diffboost_reference.data import scenes
from diffboost_reference.evaluation import metrics
from diffboost_reference.evaluation.classifier import AttributeClassifier, evaluator_available, load_evaluator


def test_psnr_known_values() -> None:
    x = torch.full((2, 3, 16, 16), 0.5)
    assert torch.isinf(metrics.psnr(x, x))
    assert metrics.psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-4)
    u8 = np.full((16, 16, 3), 100, np.uint8)
    assert metrics.psnr(u8, u8 + 1).item() == pytest.approx(20 * np.log10(255.0), abs=1e-6)


def test_ssim_identity_and_constant_images() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-9)
    a, b = torch.full((1, 3, 32, 32), 0.2), torch.full((1, 3, 32, 32), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)  # no variance: luminance term only
    assert metrics.ssim(a, b).item() == pytest.approx(expected, rel=1e-6)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 0 < metrics.ssim(x, noisy).item() < 0.9
    assert metrics.ssim(x, noisy, reduction="none").shape == (2,)


def test_frechet_distance() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.frechet_distance(a, a + 2.0)
    assert shifted == pytest.approx(6 * 4.0, rel=1e-6)  # mean shift only
    b = torch.randn(400, 6, generator=g) * 2
    assert metrics.frechet_distance(a, b) > 1.0


def test_trace_sqrt_product_matches_the_eigenvalues_of_the_product() -> None:
    rng = np.random.default_rng(0)
    s1 = np.cov(rng.normal(size=(50, 5)), rowvar=False)
    s2 = np.cov(rng.normal(size=(50, 5)), rowvar=False)
    ref = float(np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None))))
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-6)


def test_feature_distance_with_random_evaluator() -> None:
    torch.manual_seed(0)
    ev = AttributeClassifier(channels=(8, 8, 8, 8), embed_dim=16).eval()
    images, _ = scenes.make_batch(range(4))
    assert metrics.feature_distance(images, images, ev).item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.feature_distance(images, images, ev, kind="l2").item() == pytest.approx(0.0, abs=1e-6)
    other, _ = scenes.make_batch(range(4, 8))
    assert metrics.feature_distance(images, other, ev, kind="l2").item() > 0


@pytest.mark.skipif(not evaluator_available(), reason="assets/evaluator not trained")
def test_shipped_evaluator_reads_ground_truth() -> None:
    images, sc = scenes.make_batch(range(700_000_000, 700_000_256))
    prompts = [s.caption for s in sc]
    ev = load_evaluator()
    assert metrics.prompt_adherence(images, prompts, ev) >= 0.95
    acc = metrics.attribute_accuracy(images, prompts, ev)
    assert min(acc.values()) >= 0.95
    # a mismatched prompt list must score low
    assert metrics.prompt_adherence(images, prompts[1:] + prompts[:1], ev) < 0.2
    assert metrics.frechet_evaluator_distance(images[:128], images[128:], ev) < metrics.frechet_evaluator_distance(
        images[:128], np.full_like(images[128:], 128), ev
    )
