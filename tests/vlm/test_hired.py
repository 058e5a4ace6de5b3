"""HiRED: the budget shared over partitions by early CLS attention, filled by late CLS attention."""

import pytest
import torch

from diffboost.vlm import HiRED
from diffboost.vlm.hired import hired_select, partition_ids, share_budget


def test_partitions_of_a_grid():
    parts = partition_ids((4, 4), 2, 2).view(4, 4)
    assert parts.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_share_budget_is_proportional_sums_up_and_respects_sizes():
    w = torch.tensor([[6.0, 2.0, 1.0, 1.0]])
    sizes = torch.tensor([4, 4, 4, 4])
    # partition 0 wants 6 of its 4 tokens: it gets 4, the other 6 are shared 2:1:1 (3, 1.5, 1.5)
    assert share_budget(w, sizes, 10).tolist() == [[4, 3, 2, 1]]
    got = share_budget(torch.tensor([[5.0, 3.0, 2.0, 0.0]]), sizes, 10)[0]
    assert got.tolist() == [4, 4, 2, 0] or got.tolist() == [4, 3, 3, 0]
    assert int(got.sum()) == 10 and bool((got <= sizes).all())
    even = share_budget(torch.ones(1, 4), sizes, 8)[0]
    assert even.tolist() == [2, 2, 2, 2]


def test_select_takes_the_quota_of_each_partition_by_late_attention():
    parts = partition_ids((4, 4), 2, 2)
    early = torch.zeros(1, 16)
    early[0, parts == 0] = 1.0  # all the budget to partition 0
    late = torch.arange(16.0)[None]
    idx = hired_select(early, late, parts, 3)[0].tolist()
    assert idx == sorted(idx)
    assert idx == [1, 4, 5]  # partition 0 is {0, 1, 4, 5}; the three with most late attention
    early2 = torch.ones(1, 16)  # even split: one per partition, the best of each
    assert hired_select(early2, late, parts, 4)[0].tolist() == [5, 7, 13, 15]


@pytest.mark.parametrize("bad", [dict(partition_rows=0), dict(early_layer="1"), dict(keep=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises((TypeError, ValueError), match="HiRED"):
        HiRED(**bad)


def test_default_layers():
    assert HiRED().layers(24, 23) == (5, 22)  # an early layer (first quarter), the feature layer
    assert HiRED().layers(4, 3) == (0, 2)
    assert HiRED(early_layer=2, late_layer=-1).layers(4, 3) == (2, 3)


def test_share_budget_caps_in_several_rounds_and_takes_zero_weights():
    sizes = torch.tensor([2, 2, 10, 10])
    # round 1 caps partition 0 (wants 5 of 2, partition 1 wants 1.4); round 2 caps partition 1 (now 2.24 of 2)
    got = share_budget(torch.tensor([[50.0, 14.0, 18.0, 18.0]]), sizes, 10)[0]
    assert got.tolist() == [2, 2, 3, 3]
    assert share_budget(torch.tensor([[60.0, 20.0, 10.0, 10.0]]), sizes, 12)[0].tolist() == [2, 2, 4, 4]
    zero = share_budget(torch.zeros(1, 4), sizes, 6)[0]
    assert int(zero.sum()) == 6 and bool((zero >= 0).all())
    assert share_budget(torch.ones(1, 4), sizes, 100)[0].tolist() == [2, 2, 10, 10]  # budget above the total


def test_partition_bounds_and_integer_layers():
    assert HiRED(partition_rows=64, partition_cols=1).partition_rows == 64
    for field in ("partition_rows", "partition_cols"):
        with pytest.raises(ValueError, match=f"HiRED.{field}=65"):
            HiRED(**{field: 65})
        with pytest.raises(ValueError, match=f"HiRED.{field}=0"):
            HiRED(**{field: 0})
    early, late = HiRED().layers(24, 23)
    assert type(early) is int and type(late) is int
    assert HiRED().layers(1, 1) == (0, 0)


def test_a_split_as_fine_as_the_grid_is_allowed():
    import diffboost
    from factories import make_llava

    model, _ = make_llava()
    diffboost.apply(model, HiRED(partition_rows=8, partition_cols=8))
    diffboost.remove(model)
    with pytest.raises(ValueError, match="a 1 x 9 split does not fit"):
        diffboost.apply(model, HiRED(partition_rows=1, partition_cols=9))
