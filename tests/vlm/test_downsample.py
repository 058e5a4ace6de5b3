"""The downsampling baseline."""

import torch

from diffboost.vlm.downsample import downsample, pooled_grid


def test_pooled_grid_is_the_largest_near_square_within_budget():
    assert pooled_grid(64, (16, 16)) == (8, 8)
    assert pooled_grid(56, (16, 16)) == (7, 8)
    assert pooled_grid(28, (16, 16)) == (5, 5)
    assert pooled_grid(85, (16, 16)) == (9, 9)
    assert pooled_grid(1, (16, 16)) == (1, 1)


def test_downsample_averages_blocks():
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, one channel
    out = downsample(x, (4, 4), (2, 2))[0, :, 0]
    assert out.tolist() == [2.5, 4.5, 10.5, 12.5]
