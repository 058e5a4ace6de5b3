"""HiPrune's selection: anchors from the object layer, their grid neighbours, registers from the deep layer."""

import pytest
import torch

from diffboost.vlm import HiPrune
from diffboost.vlm.hiprune import hiprune_scores, hiprune_select, neighbours


def test_neighbours_are_the_four_grid_neighbours_inside_the_grid():
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 0] = True  # corner of a 4x4 grid
    mask[0, 10] = True  # row 2, col 2
    got = set(neighbours(mask, (4, 4))[0].nonzero().flatten().tolist())
    assert got == {1, 4} | {6, 9, 11, 14}


def test_tiers_anchor_then_buffer_then_register():
    grid = (4, 4)
    obj = torch.zeros(1, 16)
    obj[0, 5] = 1.0  # the one anchor (alpha * budget = 0.25 * 4 -> 1)
    obj[0, 6] = 0.5  # a buffer of anchor 5, ranked first among buffers
    deep = torch.arange(16.0).flip(0)[None]  # registers: prefer low indices
    scores = hiprune_scores(obj, deep, grid, budget=4, alpha=0.25)
    top = scores[0].topk(4).indices.tolist()
    assert top[0] == 5 and top[1] == 6  # anchor, then the best buffer
    assert set(top[2:]) <= {1, 4, 9}  # then the other buffers (neighbours of 5)
    # a larger budget: the remaining tokens come by deep attention (register tier)
    idx = hiprune_select(obj, deep, grid, budget=8, alpha=0.125)[0].tolist()  # still one anchor
    assert idx == sorted(idx)
    assert {5, 6, 1, 4, 9} <= set(idx)
    assert set(idx) - {5, 6, 1, 4, 9} == {0, 2, 3}  # highest deep attention among the rest


def test_alpha_sets_the_number_of_anchors():
    grid = (8, 8)
    g = torch.Generator().manual_seed(0)
    obj, deep = torch.rand(1, 64, generator=g), torch.rand(1, 64, generator=g)
    for alpha, anchors in ((0.1, 2), (0.5, 10)):
        s = hiprune_scores(obj, deep, grid, budget=20, alpha=alpha)
        assert int((s >= 2).sum()) == anchors
        assert set((s >= 2).nonzero()[:, 1].tolist()) == set(obj.topk(anchors).indices[0].tolist())


@pytest.mark.parametrize("bad", [dict(alpha=0.0), dict(alpha=1.5), dict(object_layer=1.5), dict(keep=0.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises((TypeError, ValueError), match="HiPrune"):
        HiPrune(**bad)


def test_tiers_hold_whatever_the_scale_and_offset_of_the_maps():
    grid = (4, 4)
    obj = 5.0 + torch.zeros(1, 16)
    obj[0, 5] = 6.0  # one anchor, offset maps (min 5, not 0)
    deep = 100.0 + torch.arange(16.0)[None] * 10  # registers would outrank buffers if not scaled into [0, 1)
    s = hiprune_scores(obj, deep, grid, budget=4, alpha=0.25)[0]
    assert s[5] >= 2 > s[[1, 4, 6, 9]].min() >= 1 > s[[0, 15]].max()
    assert hiprune_select(obj, deep, grid, budget=5, alpha=0.2)[0].tolist() == [1, 4, 5, 6, 9]


def test_default_layers_follow_the_paper():
    # CLIP-L (24 layers, features from layer -2): object layer 9 (index 8), registers from the feature layer
    assert HiPrune().layers(24, 23) == (8, 22)
    assert HiPrune().layers(4, 3) == (1, 2)
    assert HiPrune(object_layer=-1, deep_layer=0).layers(4, 3) == (3, 0)
    assert HiPrune().layers(2, 2) == (0, 1)
