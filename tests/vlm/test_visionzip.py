"""VisionZip: dominant tokens by CLS attention, contextual tokens merged by key similarity."""

import pytest
import torch

from diffboost.vlm import VisionZip
from diffboost.vlm.visionzip import split_budget, visionzip_merge


def test_split_budget():
    assert split_budget(64, 54 / 64) == (54, 10)
    assert split_budget(1, 0.84) == (1, 0)
    assert split_budget(10, 1.0) == (10, 0)


def test_dominant_tokens_then_merged_context():
    n, width = 8, 2
    features = torch.arange(n * width, dtype=torch.float).view(1, n, width)
    cls = torch.tensor([[0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0]])
    # keys: tokens 0, 2, 3 point one way, 5, 6, 7 the other
    keys = torch.tensor([[[1.0, 0], [0, 1], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [0.2, 1], [0.1, 1.2]]])
    kept, dom = visionzip_merge(features, cls, keys, budget=4, dominant=0.5)
    assert dom[0].tolist() == [1, 4]
    assert torch.equal(kept[0, :2], features[0, [1, 4]])
    # remaining 0,2,3,5,6,7; two targets spread evenly: 0 and 5; groups {0,2,3} and {5,6,7}
    assert torch.allclose(kept[0, 2], features[0, [0, 2, 3]].mean(0))
    assert torch.allclose(kept[0, 3], features[0, [5, 6, 7]].mean(0))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="VisionZip.dominant"):
        VisionZip(dominant=0.0)


def test_default_layer_is_the_feature_layer():
    from diffboost.vlm.base import resolve_layer

    assert resolve_layer(VisionZip(), "layer", 24, 22) == 22
    assert resolve_layer(VisionZip(layer=-1), "layer", 24, 22) == 23
