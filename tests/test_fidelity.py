"""diffboost.fidelity's pooled PSNR (the bench's and calibrate's measure) on exact numbers."""

import math

import torch

from diffboost.fidelity import pooled_psnr


def test_pooled_psnr_is_the_psnr_of_the_mean_mse():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 0.125  # MSE 2**-6 (exact in float32); the identical pair: inf
    pooled, worst = pooled_psnr(a, b)
    assert math.isclose(pooled, -10 * math.log10(2**-7), rel_tol=1e-12)  # the mean MSE, not the mean PSNR
    assert math.isclose(worst, -10 * math.log10(2**-6), rel_tol=1e-12)
    assert pooled_psnr(a, a) == (math.inf, math.inf)
