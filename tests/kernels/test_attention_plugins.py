"""QuantizedAttention and SparseAttention on pipelines: both routes (diffusers' dispatcher on Flux,
processors on the SD UNet), exactness of a keep-everything setting, exact restore, per-layer and
per-step options, counts, backend registration and removal, two pipelines, stacking, stack files and
configs. Every family: tests/plugins/test_support.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffboost
from diffboost import EasyCache, QuantizedAttention, SparseAttention, UnsupportedPipelineError
from factories import FAMILIES, make_flux, make_sd, run


@pytest.fixture(scope="module")
def flux():
    pipe = make_flux()
    return pipe, run(pipe, "flux")


@pytest.fixture(scope="module")
def sd():
    pipe = make_sd()
    return pipe, run(pipe, "sd")


def _members():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return ([m for m in AttentionBackendName.__members__ if m.startswith("DIFFBOOST")],
            [b for b in _AttentionBackendRegistry._backends if str(b.value).startswith("diffboost")])


def _stats(pipe):
    return diffboost.call_stats(pipe)[0].details


@pytest.mark.parametrize("which", ["flux", "sd"])
def test_keeping_every_block_is_bit_identical_and_remove_restores(which, request):
    pipe, base = request.getfixturevalue(which)
    with diffboost.accelerated(pipe, SparseAttention(cdf_threshold=1.0)):
        assert torch.equal(run(pipe, which), base)
    for cfg in (QuantizedAttention(), SparseAttention(cdf_threshold=0.3, sim_threshold=-1.0, block_q=4, block_k=4)):
        with diffboost.accelerated(pipe, cfg):
            out = run(pipe, which)
            stats = _stats(pipe)
        assert torch.isfinite(out).all() and not torch.equal(out, base), cfg
        assert stats["kernel_calls"] > 0
        if isinstance(cfg, SparseAttention):
            assert stats["sparsity"] > 0.2  # the tiny UNet attends over 16 tokens: 4 x 4 blocks
        assert torch.equal(run(pipe, which), base), f"remove() after {cfg}"
    assert _members() == ([], [])


def test_flux_goes_through_the_dispatcher_and_counts_every_attention_call(flux):
    pipe, base = flux
    procs = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    before = [dict(vars(p)) for p in procs]
    with diffboost.accelerated(pipe, QuantizedAttention()):
        names, registered = _members()
        assert len(names) == 1 and len(registered) == 1
        assert all(p._attention_backend == registered[0] for p in procs)
        run(pipe, "flux")
        stats = _stats(pipe)
    # 4 blocks (2 double + 2 single), 4 steps x 2 (true CFG off in the tiny call: 1 pass per step)
    calls = pipe.transformer.config.num_layers + pipe.transformer.config.num_single_layers
    assert stats["layers"] == calls
    assert stats["exact_calls"] == 0 and stats["kernel_calls"] % calls == 0 and stats["kernel_calls"] >= 4 * calls
    assert [dict(vars(p)) for p in procs] == before


def test_sd_replaces_self_attention_processors_and_leaves_cross_attention_exact(sd):
    pipe, base = sd
    originals = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    with diffboost.accelerated(pipe, SparseAttention(cdf_threshold=0.5, block_q=16, block_k=16)):
        replaced = {n for n, m in pipe.unet.named_modules() if hasattr(m, "processor")
                    and type(m.processor).__name__ == "KernelAttnProcessor"}
        assert replaced == set(originals)
        run(pipe, "sd")
        stats = _stats(pipe)
    assert stats["kernel_calls"] == stats["exact_calls"]  # attn1 (self) by the kernel, attn2 (text) exact
    assert {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")} == originals
    with diffboost.accelerated(pipe, SparseAttention(cdf_threshold=0.5, cross_attention=True)):
        run(pipe, "sd")
        assert _stats(pipe)["exact_calls"] == 0


def test_dense_layers_and_steps(flux):
    pipe, base = flux
    with diffboost.accelerated(pipe, QuantizedAttention(dense_first_layers=1, dense_last_layers=2)):
        run(pipe, "flux")
        full = _stats(pipe)
    assert full["layers"] == 1
    with diffboost.accelerated(pipe, QuantizedAttention(dense_steps=3)):
        run(pipe, "flux", num_inference_steps=4)
        gated = _stats(pipe)
    assert gated["kernel_calls"] == 4 and gated["exact_calls"] == 12  # 4 layers: step 3 only
    with diffboost.accelerated(pipe, QuantizedAttention(dense_steps=100)):
        assert torch.equal(run(pipe, "flux"), base)


def test_sparse_reports_its_sparsity(sd):
    pipe, base = sd
    with diffboost.accelerated(pipe, SparseAttention(cdf_threshold=0.3, sim_threshold=-1.0, block_q=4, block_k=4)):
        run(pipe, "sd")
        first = _stats(pipe)["sparsity"]
        run(pipe, "sd")
        second = _stats(pipe)["sparsity"]
    assert 0 < first < 1 and first == second  # per call, not accumulated


def test_two_pipelines_with_different_settings():
    a, b = make_flux(), make_flux()
    base = run(a, "flux")
    with diffboost.accelerated(a, SparseAttention(cdf_threshold=1.0)), diffboost.accelerated(b, QuantizedAttention()):
        assert len(_members()[0]) == 2
        assert torch.equal(run(a, "flux"), base)
        assert not torch.equal(run(b, "flux"), base)
    assert _members() == ([], [])


def test_stacks_with_a_cache_and_saves_as_a_file(flux, tmp_path):
    pipe, base = flux
    stack = [QuantizedAttention(pv_format="fp8_e4m3"), EasyCache(threshold=0.5, warmup=2)]
    path = diffboost.save(stack, tmp_path / "s.toml")
    assert diffboost.load(path) == stack
    with diffboost.accelerated(pipe, diffboost.load(path)):
        out = run(pipe, "flux")
        kinds = [s.plugin for s in diffboost.call_stats(pipe)]
    assert torch.isfinite(out).all() and len(kinds) == 2
    assert torch.equal(run(pipe, "flux"), base)


def test_a_pipeline_without_a_routable_processor_is_refused(flux):
    pipe, base = flux

    class Opaque:
        def __call__(self, *args, **kwargs):  # pragma: no cover - never called
            raise AssertionError

    saved = {m: m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")}
    try:
        for m in saved:
            m.processor = Opaque()
        with pytest.raises(UnsupportedPipelineError, match="no attention processor diffboost can route .*Opaque"):
            diffboost.apply(pipe, SparseAttention())
        assert not hasattr(pipe, "_diffboost_handle")
    finally:
        for m, p in saved.items():
            m.processor = p
    assert torch.equal(run(pipe, "flux"), base)


@pytest.mark.parametrize("cls, kwargs, message", [
    (QuantizedAttention, {"qk_format": "int4"}, "qk_format must be one of"),
    (QuantizedAttention, {"pv_format": "bf16"}, "pv_format must be one of"),
    (QuantizedAttention, {"block_q": 0}, "block_q"),
    (QuantizedAttention, {"dense_steps": -1}, "dense_steps"),
    (SparseAttention, {"cdf_threshold": 1.5}, "cdf_threshold must be in (0, 1]"),
    (SparseAttention, {"topk": 0}, "topk must be a fraction"),
    (SparseAttention, {"impl": "triton"}, "SparseAttention.impl='triton' is not supported; choose one of"),
    (SparseAttention, {"cross_attention": 1}, "cross_attention"),
])
def test_configs_are_validated(cls, kwargs, message):
    with pytest.raises((ValueError, TypeError)) as err:
        cls(**kwargs)
    assert message in str(err.value)


def test_configs_are_data():
    cfg = SparseAttention(cdf_threshold=0.9)
    assert dataclasses.replace(cfg, topk=0.5).topk == 0.5 and cfg.never_skips() is False
    assert SparseAttention(cdf_threshold=1.0).never_skips() and not SparseAttention(cdf_threshold=1.0, topk=0.5).never_skips()
    assert not QuantizedAttention().never_skips()


@pytest.mark.parametrize("plugin", [QuantizedAttention(),
                                    SparseAttention(cdf_threshold=0.5, sim_threshold=-1.0, block_q=16, block_k=16)],
                         ids=lambda p: type(p).__name__)
def test_under_regional_compile(plugin):
    """Compiled blocks (backend "eager") give the eager outputs; the quantized kernel traces whole
    (no graph break inside a block), the sparse one breaks where the kept blocks decide shapes."""
    from torch._dynamo.utils import counters

    pipe = make_flux()
    with diffboost.accelerated(pipe, plugin):
        eager = run(pipe, "flux", num_inference_steps=4)
    torch._dynamo.reset()
    counters.clear()
    for block in list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks):
        block.compile(backend="eager")
    try:
        with diffboost.accelerated(pipe, plugin):
            out = run(pipe, "flux", num_inference_steps=4)
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["calls_captured"] > 0
    assert torch.equal(out, eager)
    if isinstance(plugin, QuantizedAttention):
        assert not counters["graph_break"], dict(counters["graph_break"])
    else:
        assert any("nonzero" in r or "item()" in r for r in counters["graph_break"])


def test_with_model_cpu_offload_and_in_bfloat16():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = make_flux()
    pipe.enable_model_cpu_offload(device=device)
    base = run(pipe, "flux")
    with diffboost.accelerated(pipe, SparseAttention(cdf_threshold=1.0)):
        assert torch.equal(run(pipe, "flux"), base)
    with diffboost.accelerated(pipe, QuantizedAttention()):
        a, b = run(pipe, "flux"), run(pipe, "flux")  # diffusers re-applies the offload hooks after every call
        assert _stats(pipe)["kernel_calls"] > 0
    assert torch.equal(a, b) and not torch.equal(a, base)
    assert torch.equal(run(pipe, "flux"), base)
    half = make_flux().to(torch.bfloat16)
    plain = run(half, "flux")
    with diffboost.accelerated(half, QuantizedAttention()):
        out = run(half, "flux")
    assert out.dtype == plain.dtype and torch.isfinite(out.float()).all()
    assert (out.float() - plain.float()).abs().mean() < 0.05 * plain.float().abs().mean()


def test_processors_calling_sdpa_themselves_are_redirected_only_inside_their_module():
    """SD3's JointAttnProcessor2_0 calls F.scaled_dot_product_attention itself: the kernel answers it
    inside the attention modules' forward, nowhere else, and under regional compile without a graph
    break."""
    from torch._dynamo.utils import counters

    pipe = FAMILIES["sd3"]()
    base = run(pipe, "sd3", num_inference_steps=4)
    q = torch.randn(1, 2, 32, 8)
    with diffboost.accelerated(pipe, QuantizedAttention(dense_first_layers=1)):
        out = run(pipe, "sd3", num_inference_steps=4)
        stats = _stats(pipe)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # outside the pipeline: not ours
        assert _stats(pipe) == stats
        # every step, every routed layer; the first layer (dense) is not even hooked
        assert stats["kernel_calls"] == 4 * stats["layers"] and stats["exact_calls"] == 0
        torch._dynamo.reset()
        counters.clear()
        for block in pipe.transformer.transformer_blocks:
            block.compile(backend="eager")
        try:
            compiled = run(pipe, "sd3", num_inference_steps=4)
        finally:
            torch._dynamo.reset()
            for block in pipe.transformer.transformer_blocks:
                block._compiled_call_impl = None
    assert stats["layers"] == len(pipe.transformer.transformer_blocks) - 1
    assert not torch.equal(out, base) and torch.equal(compiled, out)
    assert counters["stats"]["calls_captured"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(run(pipe, "sd3", num_inference_steps=4), base)


def test_the_redirect_hands_masked_and_grouped_query_calls_on_correctly():
    from diffboost.kernels.attention import _Counters, _redirected_sdpa

    class Owner:
        active, exact, cfg = True, False, QuantizedAttention(pv_format="fp32")
        key_padding = True  # a (16, 16) causal mask is not a key-padding mask: still exact
        counters = _Counters()
        kernel = staticmethod(QuantizedAttention(pv_format="fp32").kernel())

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(_redirected_sdpa(Owner, sdpa, q, q, q, attn_mask=mask), sdpa(q, q, q, attn_mask=mask))
    assert torch.equal(_redirected_sdpa(Owner, sdpa, q, q, q, is_causal=True), sdpa(q, q, q, is_causal=True))
    assert Owner.counters.exact_calls == 2 and Owner.counters.kernel_calls == 0
    gqa = _redirected_sdpa(Owner, sdpa, q, k, k, enable_gqa=True, scale=0.3)
    exact = sdpa(q, k, k, enable_gqa=True, scale=0.3)
    assert Owner.counters.kernel_calls == 1 and gqa.shape == exact.shape
    assert torch.nn.functional.cosine_similarity(gqa.flatten(), exact.flatten(), dim=0) > 0.999


def test_another_dispatcher_backend_computes_the_routed_calls(flux, sd):
    """backend= hands the routed calls to a diffusers backend (here PyTorch's math kernel, the one
    available on every machine), with the same layer rules; a backend that is not installed is
    refused at apply() naming it, a name diffusers does not know at construction."""
    from diffboost.kernels.attention import backend_choices

    assert "xformers" in backend_choices() and "sage" in backend_choices()
    assert not [b for b in backend_choices() if b.endswith("_hub")]
    for pipe, family in ((flux[0], "flux"), (sd[0], "sd")):
        base = run(pipe, family)
        with diffboost.accelerated(pipe, SparseAttention(cdf_threshold=1.0, backend="_native_math")):
            out = run(pipe, family)
            stats = _stats(pipe)
        assert stats["kernel_calls"] > 0 and torch.allclose(out, base, atol=1e-4), family
    with pytest.raises(ValueError, match="backend='bogus' is not supported; choose one of .*xformers"):
        QuantizedAttention(backend="bogus")
    from diffusers.models.attention_dispatch import _CAN_USE_XFORMERS_ATTN

    if not _CAN_USE_XFORMERS_ATTN:
        with pytest.raises(UnsupportedPipelineError, match=r"backend='xformers'\) cannot run here: .*xformers"):
            diffboost.apply(flux[0], QuantizedAttention(backend="xformers"))
        assert not hasattr(flux[0], "_diffboost_handle")


def test_key_padding_masks_reach_the_quantized_kernel_and_other_masks_stay_exact():
    """The routes that see SDPA-layout masks (the dispatcher backend, the SDPA redirect) hand a
    key-padding mask to QuantizedAttention's kernel; a query-dependent mask, SparseAttention, and
    the classic processor route keep exact attention for masked calls."""
    import types

    import torch.nn.functional as F

    from diffboost.kernels import QuantizedAttention, SparseAttention
    from diffboost.kernels import attention as att

    def owner(cfg):
        return types.SimpleNamespace(active=True, exact=False, key_padding=cfg.takes_key_padding(), cfg=cfg,
                                     kernel=cfg.kernel(), counters=att._Counters())

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))
    keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    keep[1, ..., 17:] = False
    quant = owner(QuantizedAttention(block_k=8))
    out = att._redirected_sdpa(quant, F.scaled_dot_product_attention, q, k, v, attn_mask=keep)
    assert quant.counters.kernel_calls == 1 and quant.counters.exact_calls == 0
    assert torch.equal(out, QuantizedAttention(block_k=8).kernel()(q, k, v, keep))
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))  # quantized, not exact
    per_query = torch.rand(2, 1, 24, 24) > 0.2
    exact = att._redirected_sdpa(quant, F.scaled_dot_product_attention, q, k, v, attn_mask=per_query)
    assert quant.counters.exact_calls == 1 and torch.equal(exact, F.scaled_dot_product_attention(q, k, v, attn_mask=per_query))
    sparse = owner(SparseAttention())
    assert not SparseAttention().takes_key_padding() and QuantizedAttention().takes_key_padding()
    att._redirected_sdpa(sparse, F.scaled_dot_product_attention, q, k, v, attn_mask=keep)
    assert sparse.counters.exact_calls == 1 and sparse.counters.kernel_calls == 0
    assert not att._padding_shaped(per_query) and att._padding_shaped(keep) and att._padding_shaped(keep[0, 0, 0])
    assert not att._padding_shaped(keep[:, 0, 0])  # (2, 24) is (queries, keys) to SDPA
