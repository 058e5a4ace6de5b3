"""diffboost/plugins/base.py: the validation helpers' exact boundaries and messages, the Plugin and
Installed defaults, the plugin kinds."""

from __future__ import annotations

import dataclasses
import math

import pytest

from diffboost.plugins.base import Installed, Plugin, PluginKind, _range, check_choice, check_float, check_int


@dataclasses.dataclass
class Cfg:
    value: object = 0


def ok(check, value, *args, **kwargs) -> bool:
    check(Cfg(value), "value", *args, **kwargs)
    return True


def message(check, value, *args, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError)) as err:
        check(Cfg(value), "value", *args, **kwargs)
    return f"{err.type.__name__}: {err.value}"


# ----------------------------------------------------------------------------------------------
# check_int
# ----------------------------------------------------------------------------------------------


def test_check_int_bounds_are_inclusive():
    assert ok(check_int, 1, 1, 4) and ok(check_int, 4, 1, 4) and ok(check_int, 2, 1, 4)
    assert message(check_int, 0, 1, 4) == "ValueError: Cfg.value=0 is out of range; allowed: >= 1 and <= 4"
    assert message(check_int, 5, 1, 4) == "ValueError: Cfg.value=5 is out of range; allowed: >= 1 and <= 4"


def test_check_int_one_sided_and_open_ranges():
    assert ok(check_int, -(10**9), None, 4) and ok(check_int, 10**9, 1) and ok(check_int, -7)
    assert message(check_int, 0, 1) == "ValueError: Cfg.value=0 is out of range; allowed: >= 1"
    assert message(check_int, 5, None, 4) == "ValueError: Cfg.value=5 is out of range; allowed: <= 4"
    assert message(check_int, -1, 0, None) == "ValueError: Cfg.value=-1 is out of range; allowed: >= 0"


def test_check_int_rejects_bools_floats_and_strings():
    assert message(check_int, True, 0, 4) == "TypeError: Cfg.value must be an int, got bool (True)"
    assert message(check_int, False) == "TypeError: Cfg.value must be an int, got bool (False)"
    assert message(check_int, 2.0, 0, 4) == "TypeError: Cfg.value must be an int, got float (2.0)"
    assert message(check_int, "3") == "TypeError: Cfg.value must be an int, got str ('3')"


# ----------------------------------------------------------------------------------------------
# check_float
# ----------------------------------------------------------------------------------------------


def test_check_float_bounds_are_inclusive_unless_lo_open():
    assert ok(check_float, 0.0, 0.0, 1.0) and ok(check_float, 1.0, 0.0, 1.0) and ok(check_float, 0.5, 0.0, 1.0)
    assert message(check_float, -0.001, 0.0, 1.0) == (
        "ValueError: Cfg.value=-0.001 is out of range; allowed: >= 0.0 and <= 1.0"
    )
    assert message(check_float, 1.001, 0.0, 1.0) == (
        "ValueError: Cfg.value=1.001 is out of range; allowed: >= 0.0 and <= 1.0"
    )
    assert ok(check_float, 1e-9, 0.0, 1.0, lo_open=True) and ok(check_float, 1.0, 0.0, 1.0, lo_open=True)
    assert message(check_float, 0.0, 0.0, 1.0, lo_open=True) == (
        "ValueError: Cfg.value=0.0 is out of range; allowed: > 0.0 and <= 1.0"
    )
    assert message(check_float, -1.0, 0.0, None, lo_open=True) == (
        "ValueError: Cfg.value=-1.0 is out of range; allowed: > 0.0"
    )


def test_check_float_one_sided_and_open_ranges():
    assert ok(check_float, -1e30) and ok(check_float, 1e30, 0.0) and ok(check_float, -1e30, None, 2.5)
    assert message(check_float, 2.6, None, 2.5) == "ValueError: Cfg.value=2.6 is out of range; allowed: <= 2.5"
    assert message(check_float, -0.5, 0) == "ValueError: Cfg.value=-0.5 is out of range; allowed: >= 0"
    # lo_open without lo: no lower bound at all
    assert ok(check_float, -5.0, None, 1.0, lo_open=True)


def test_check_float_accepts_ints_and_rejects_bools_strings_and_non_finite():
    assert ok(check_float, 3, 0.0, 4.0)
    assert message(check_float, True, 0.0, 4.0) == "TypeError: Cfg.value must be a number, got bool (True)"
    assert message(check_float, "0.1") == "TypeError: Cfg.value must be a number, got str ('0.1')"
    assert message(check_float, None) == "TypeError: Cfg.value must be a number, got NoneType (None)"
    assert message(check_float, math.nan) == "ValueError: Cfg.value must be finite, got nan"
    assert message(check_float, math.inf, 0.0) == "ValueError: Cfg.value must be finite, got inf"
    assert message(check_float, -math.inf, None, 1.0) == "ValueError: Cfg.value must be finite, got -inf"


# ----------------------------------------------------------------------------------------------
# check_choice, _range
# ----------------------------------------------------------------------------------------------


def test_check_choice():
    assert ok(check_choice, "a", ("a", "b")) and ok(check_choice, "b", iter(["a", "b"]))
    assert message(check_choice, "c", ("a", "b")) == "ValueError: Cfg.value='c' is not supported; choose one of ('a', 'b')"
    # a generator is read once, and the message still lists it
    assert message(check_choice, 3, (n for n in (1, 2))) == "ValueError: Cfg.value=3 is not supported; choose one of (1, 2)"


def test_range_text():
    assert _range(None, None) == "any"
    assert _range(1, None) == ">= 1" and _range(None, 2) == "<= 2" and _range(1, 2) == ">= 1 and <= 2"
    assert _range(0, 1, "> 0") == "> 0 and <= 1" and _range(None, None, "> 0") == "> 0"


# ----------------------------------------------------------------------------------------------
# Plugin, Installed, PluginKind
# ----------------------------------------------------------------------------------------------


def test_plugin_defaults():
    @dataclasses.dataclass(frozen=True)
    class MyPlugin(Plugin):
        x: int = 1

    p = MyPlugin(2)
    assert p.name == "MyPlugin" and p.kind is PluginKind.CACHE and p.never_skips() is False
    assert repr(p) == "test_plugin_defaults.<locals>.MyPlugin(x=2)"  # kind is not in the repr
    assert "kind" not in {f.name for f in dataclasses.fields(p) if f.init}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3
    with pytest.raises(NotImplementedError):
        Plugin().install(None, None)


def test_installed_defaults():
    item = Installed()
    assert item.reset() is None and item.stats() == {}
    with pytest.raises(NotImplementedError):
        item.remove()


def test_plugin_kinds():
    assert {k.name: k.value for k in PluginKind} == {
        "ATTENTION": "attention",
        "TOKENS": "tokens",
        "CACHE": "cache",
        "STEP": "step",
        "SAMPLER": "sampler",
        "VLM": "vlm",
    }
    assert PluginKind("cache") is PluginKind.CACHE and PluginKind.CACHE == "cache"


def _plugin_classes():
    import dataclasses

    import diffboost
    from diffboost.plugins.base import Plugin

    return [c for c in vars(diffboost).values()
            if isinstance(c, type) and issubclass(c, Plugin) and c is not Plugin and dataclasses.is_dataclass(c)]


def test_every_bool_field_refuses_non_bools():
    """``TaylorSeer(lite="yes")`` must fail, not read as true: every bool field of every config."""
    import dataclasses

    checked = []
    for cls in _plugin_classes():
        for f in dataclasses.fields(cls):
            if f.init and f.type in ("bool", bool):
                for bad in ("yes", 1, 0, None):
                    with pytest.raises(TypeError, match=rf"{cls.__name__}\.{f.name} must be True or False"):
                        cls(**{f.name: bad})
                for good in (True, False):
                    try:
                        plugin = cls(**{f.name: good})
                    except ValueError:  # a rule across fields (TokenMerging needs one merge_* on)
                        continue
                    assert getattr(plugin, f.name) is good
                checked.append(f"{cls.__name__}.{f.name}")
    assert {"TaylorSeer.lite", "TaylorSeer.check_finite", "SADA.token_sparsity", "TokenMerging.merge_attn",
            "AdaptiveBlockCache.check_finite", "ErrorControlledCache.check_finite"} <= set(checked), checked


def test_an_installed_thing_without_its_own_call_stats_gets_an_empty_common_part():
    from diffboost.plugins.base import CallStats, Installed

    class Counter(Installed):
        def stats(self):
            return {"n": 1}

    class Named(Counter):
        def stats(self):
            return {"n": 2, "plugin": "Named(x=1)"}

    assert Counter().call_stats() == CallStats("Counter", details={"n": 1})
    assert Named().call_stats() == CallStats("Named(x=1)", details={"n": 2, "plugin": "Named(x=1)"})
    assert Installed().call_stats() == CallStats("Installed", details={})


def test_install_each_removes_what_it_installed_when_one_refuses():
    from diffboost.plugins.base import install_each

    log = []

    class Item:
        def __init__(self, name):
            self.name = name

        def remove(self):
            log.append(("remove", self.name))

    def install_one(name):
        if name == "bad":
            raise ValueError("refused")
        log.append(("install", name))
        return Item(name)

    items = install_each(["a", "b"], install_one)
    assert [i.name for i in items] == ["a", "b"] and log == [("install", "a"), ("install", "b")]
    log.clear()
    with pytest.raises(ValueError, match="refused"):
        install_each(["a", "b", "bad", "c"], install_one)
    assert log == [("install", "a"), ("install", "b"), ("remove", "b"), ("remove", "a")]
