"""The cache plugins' hyperparameter ranges: every bound is inclusive where documented, the value just
outside it is refused with the field's name, and a bad type is a TypeError."""

import math

import pytest

from diffboost import AdaptiveBlockCache, ErrorControlledCache, TaylorSeer
from diffboost.plugins.base import PluginKind

# (plugin, field, lowest allowed, highest allowed, a value just outside each bound)
INT_RANGES = [
    (TaylorSeer, "interval", 1, 1000),
    (TaylorSeer, "order", 0, 4),
    (TaylorSeer, "warmup", 0, 10_000),
    (TaylorSeer, "final_full_steps", 0, 10_000),
    (AdaptiveBlockCache, "front_blocks", 1, 1000),
    (AdaptiveBlockCache, "back_blocks", 0, 1000),
    (AdaptiveBlockCache, "warmup", 0, 10_000),
    (AdaptiveBlockCache, "max_consecutive_skips", 1, 10_000),
    (AdaptiveBlockCache, "taylor_order", 0, 4),
    (AdaptiveBlockCache, "final_full_steps", 0, 10_000),
    (ErrorControlledCache, "order", 0, 4),
    (ErrorControlledCache, "probe_blocks", 1, 1000),
    (ErrorControlledCache, "warmup", 0, 10_000),
    (ErrorControlledCache, "max_consecutive_skips", 1, 10_000),
    (ErrorControlledCache, "final_full_steps", 0, 10_000),
]
FLOAT_RANGES = [(AdaptiveBlockCache, "threshold", 0.0, 10.0), (ErrorControlledCache, "tolerance", 0.0, 10.0)]


@pytest.mark.parametrize("cls, field, lo, hi", INT_RANGES + FLOAT_RANGES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_bounds_are_inclusive_and_the_next_value_is_refused(cls, field, lo, hi):
    assert getattr(cls(**{field: lo}), field) == lo
    assert getattr(cls(**{field: hi}), field) == hi
    step = 1 if isinstance(lo, int) else 1e-9
    for bad in (lo - step, hi + step):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}=.* out of range; allowed: >= {lo} and <= {hi}"):
            cls(**{field: bad})


@pytest.mark.parametrize("cls, field, lo, hi", INT_RANGES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_int_fields_refuse_floats_and_bools(cls, field, lo, hi):
    for bad in (float(lo) + 0.5, True):
        with pytest.raises(TypeError, match=rf"{cls.__name__}\.{field} must be an int"):
            cls(**{field: bad})


@pytest.mark.parametrize("cls, field, lo, hi", FLOAT_RANGES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_float_fields_refuse_non_finite_and_non_numbers(cls, field, lo, hi):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be finite"):
            cls(**{field: bad})
    with pytest.raises(TypeError, match="must be a number"):
        cls(**{field: "0.1"})


def test_granularity_choices_and_kind():
    assert TaylorSeer(granularity="block").granularity == "block"
    with pytest.raises(ValueError, match=r"TaylorSeer.granularity='blocks' is not supported; choose one of \('module', 'block'\)"):
        TaylorSeer(granularity="blocks")
    for plugin in (TaylorSeer(), AdaptiveBlockCache(), ErrorControlledCache()):
        assert plugin.kind is PluginKind.CACHE


def test_never_skips_only_at_the_exact_settings():
    assert TaylorSeer(interval=1).never_skips() and not TaylorSeer(interval=2).never_skips()
    assert ErrorControlledCache(tolerance=0).never_skips() and not ErrorControlledCache(tolerance=1e-9).never_skips()
