"""Plugins under regional torch.compile of the denoiser's blocks (backend "eager" keeps CI fast;
Dynamo's tracing and graph-break behaviour are the same as with inductor)."""

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


@pytest.fixture(scope="module")
def eager_and_compiled():
    pipe = make_flux()
    eager = {}
    for plugin in CONFIGS:
        with diffboost.accelerated(pipe, plugin):
            eager[plugin] = run(pipe, "flux", num_inference_steps=6)
    torch._dynamo.reset()
    for block in list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks):
        block.compile(backend="eager")
    return pipe, eager


@pytest.mark.parametrize("plugin", CONFIGS, ids=repr)
def test_compiled_blocks_give_the_same_outputs(eager_and_compiled, plugin):
    from torch._dynamo.utils import counters

    pipe, eager = eager_and_compiled
    counters.clear()
    with diffboost.accelerated(pipe, plugin):
        out = run(pipe, "flux", num_inference_steps=6)
    torch.testing.assert_close(out, eager[plugin], rtol=1e-5, atol=1e-5)
    if plugin.granularity == "block" if isinstance(plugin, TaylorSeer) else True:
        reasons = " ".join(counters["graph_break"])
        # the only breaks allowed are the hooks' own frames at block boundaries
        assert "ForecastUnitHook" not in reasons
        for reason in counters["graph_break"]:
            assert "Block" in reason or "Hook" in reason, reason
