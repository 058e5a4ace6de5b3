"""Plugins under regional torch.compile of the denoiser's blocks (backend "eager" keeps CI fast;
Dynamo's tracing and graph-break behaviour are the same as with inductor).

Every case starts from a fresh Dynamo state and freshly compiled blocks, and proves that
compilation happened: graphs were captured (a block that silently fell back to eager, e.g. after
hitting the recompile limit in an earlier case, captures none), with no graph break inside a block
for the compile-friendly configurations. The "eager" backend runs the captured ATen graph as is, so
compiled results are compared with ``torch.equal``.
"""

import pytest
import torch

import diffboost
from diffboost import AdaptiveBlockCache, ErrorControlledCache, TaylorSeer
from factories import make_flux, run

CONFIGS = [
    TaylorSeer(interval=1, granularity="block"),
    TaylorSeer(interval=2, warmup=1, granularity="block"),
    TaylorSeer(interval=2, warmup=1),  # module granularity: works, but breaks graphs inside blocks
    AdaptiveBlockCache(threshold=10, warmup=1),
    ErrorControlledCache(tolerance=10, warmup=2),
]


def _blocks(pipe):
    return list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)


@pytest.mark.parametrize("plugin", CONFIGS, ids=repr)
def test_compiled_blocks_give_the_same_outputs(plugin):
    from torch._dynamo.utils import counters

    pipe = make_flux()
    with diffboost.accelerated(pipe, plugin):
        eager = run(pipe, "flux", num_inference_steps=6)
        eager_stats = diffboost.describe(pipe)["last_call"][0]["branches"]
    torch._dynamo.reset()
    counters.clear()
    for block in _blocks(pipe):
        block.compile(backend="eager")
    try:
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "flux", num_inference_steps=6)
            stats = diffboost.describe(pipe)["last_call"][0]["branches"]
    finally:
        torch._dynamo.reset()
    # compilation happened: at least one graph per block class, and calls went through Dynamo
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert counters["stats"]["calls_captured"] > 0
    assert stats == eager_stats
    assert torch.equal(out, eager)
    # every graph break is Dynamo skipping one of our hooks' own frames (torch.compiler.disable):
    # none comes from the hooks' bookkeeping (gates, Taylor factors) being traced
    assert counters["graph_break"], "the hooks' frames must be skipped, not traced"
    for reason in counters["graph_break"]:
        assert reason.startswith("Skip inlining `torch.compiler.disable()`d function"), reason
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    if isinstance(plugin, TaylorSeer) and plugin.granularity == "module":
        # hooks on attention / feed-forward split every block into several graphs
        assert counters["stats"]["unique_graphs"] > 4
    else:
        # hooks only at block boundaries: whole-block graphs, one per block class (+ at most one
        # variant), and no graph for the hooks' arithmetic
        assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
