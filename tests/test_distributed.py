"""diffboost.distributed: what torchrun's environment means for a batch."""

import pytest

from diffboost.distributed import Ranks, device_for, finish, from_env, gather, init


def test_ranks_from_torchrun_environment():
    assert from_env({}) == Ranks(0, 1, 0) and not from_env({}).distributed
    r = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (r.rank, r.world, r.local_rank, r.distributed) == (3, 4, 1, True)
    assert [i for i in range(10) if r.owns(i)] == [3, 7]
    assert sorted(i for k in range(4) for i in range(10) if Ranks(k, 4).owns(i)) == list(range(10))
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "0"}, {"RANK": "-1", "WORLD_SIZE": "2"},
                {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match="RANK|WORLD_SIZE"):
            from_env(bad)


def test_one_process_needs_no_process_group():
    one = Ranks()
    init(one, "cpu")
    assert gather(one, {"made": 2}) == [{"made": 2}]
    finish(one)
    assert device_for(one) in ("cpu", "cuda:0")
