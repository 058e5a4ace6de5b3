"""diffboost/plugins/stacking.py: which stacks are refused and why, and the installation order."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

import diffboost
from diffboost import SADA, BottleneckSampling, TaylorSeer, TokenMerging
from diffboost.plugins import stacking
from diffboost.plugins.base import Plugin, PluginKind
from diffboost.plugins.stacking import (
    CONFLICTS,
    ORDER,
    SINGLETON_KINDS,
    IncompatiblePluginsError,
    check_stack,
)


def fake(kind: PluginKind, label: str = ""):
    """A plugin config of the given kind; the class name is the kind's value plus label."""

    @dataclasses.dataclass(frozen=True)
    class Fake(Plugin):
        def __post_init__(self):
            object.__setattr__(self, "kind", kind)

    Fake.__name__ = Fake.__qualname__ = f"{kind.value.capitalize()}{label}"
    return Fake()


def test_installation_order_is_inner_to_outer():
    assert ORDER == (PluginKind.ATTENTION, PluginKind.TOKENS, PluginKind.CACHE, PluginKind.STEP, PluginKind.SAMPLER)
    assert SINGLETON_KINDS == frozenset(ORDER) and CONFLICTS == {}
    plugins = [fake(k) for k in ORDER]
    for perm in itertools.permutations(plugins):
        assert check_stack(list(perm)) == plugins
    assert check_stack([]) == []


def test_real_plugins_stack_in_order():
    stack = [BottleneckSampling(), SADA(), TaylorSeer(), TokenMerging()]
    assert [p.name for p in check_stack(stack)] == ["TokenMerging", "TaylorSeer", "SADA", "BottleneckSampling"]
    assert [p.kind for p in check_stack(stack)] == [PluginKind.TOKENS, PluginKind.CACHE, PluginKind.STEP, PluginKind.SAMPLER]


@pytest.mark.parametrize("kind", ORDER, ids=lambda k: k.value)
def test_at_most_one_plugin_of_each_kind(kind):
    a, b = fake(kind, "A"), fake(kind, "B")
    other = fake(PluginKind.CACHE if kind != PluginKind.CACHE else PluginKind.STEP)
    with pytest.raises(IncompatiblePluginsError) as err:
        check_stack([a, other, b])
    name = kind.value.capitalize()
    assert str(err.value) == (
        f"{name}A and {name}B are both {kind.value} plugins and a stack holds at most one {kind.value} plugin "
        "(see diffboost.plugins.stacking)"
    )
    # the same config twice is refused too
    with pytest.raises(IncompatiblePluginsError, match="at most one"):
        check_stack([a, a])


def test_vlm_plugins_are_refused_on_pipelines():
    vlm = fake(PluginKind.VLM, "Probe")
    for stack in ([vlm], [fake(PluginKind.CACHE), vlm]):
        with pytest.raises(IncompatiblePluginsError) as err:
            check_stack(stack)
        assert str(err.value) == (
            "VlmProbe acts on Transformers vision-language models; use diffboost.apply(model, ...) on the model, "
            "not on a Diffusers pipeline"
        )
    assert issubclass(IncompatiblePluginsError, ValueError)
    assert diffboost.IncompatiblePluginsError is IncompatiblePluginsError


def test_conflicting_pairs_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setitem(CONFLICTS, frozenset({"CacheX", "StepY"}), "they fight over the scheduler")
    x, y, z = fake(PluginKind.CACHE, "X"), fake(PluginKind.STEP, "Y"), fake(PluginKind.TOKENS, "Z")
    for stack in ([x, y], [y, x], [z, y, x]):
        with pytest.raises(IncompatiblePluginsError) as err:
            check_stack(stack)
        assert str(err.value) == "CacheX cannot be stacked with StepY: they fight over the scheduler"
    # one of the pair alone, or with others, is fine
    assert check_stack([x, z]) == [z, x] and check_stack([y]) == [y]
    assert stacking.CONFLICTS is CONFLICTS


def test_a_plugin_refuses_the_kinds_it_names_in_either_order():
    """``Plugin.refuses``: OneStep names caches and step plugins; every other kind stacks with it."""
    from diffboost import OneStep

    one = OneStep("student")
    assert set(one.refuses) == {PluginKind.CACHE, PluginKind.STEP}
    for other, why in ((fake(PluginKind.CACHE), "nothing to cache"), (fake(PluginKind.STEP), "no steps to skip")):
        for stack in ([one, other], [other, one]):
            with pytest.raises(IncompatiblePluginsError,
                               match=f"^OneStep cannot be stacked with {type(other).__name__} "
                                     f"\\({other.kind.value} plugin\\): .*{why}"):
                check_stack(stack)
    assert check_stack([one, fake(PluginKind.ATTENTION), fake(PluginKind.TOKENS)])[-1] is one
    assert all(not p.refuses for p in (TaylorSeer(), SADA(), TokenMerging()))
