"""The support table in README.md, cell by cell, on every family's tiny pipeline.

The caches (TaylorSeer, AdaptiveBlockCache, ErrorControlledCache, EasyCache) run on every family: exactness,
remove() and real skipping are in tests/plugins/test_families.py. Here, for the methods that do not run
everywhere, each family either runs the method (a never-skipping setting is bit-identical, a skipping
one skips and changes the output, remove() restores the pipeline) or refuses it at apply() with
UnsupportedPipelineError saying why. The README's table is built from SUPPORT and checked against it.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

import diffboost
from diffboost import (
    SADA,
    BottleneckSampling,
    QuantizedAttention,
    SparseAttention,
    TokenDownsampling,
    TokenMerging,
    UnsupportedPipelineError,
)
from factories import FAMILIES, run

STEPS = 8
#: the methods that do not run on every family, and where they run
#: "attention_masked": the attention kernels install, but every softmax attention call of the family
#: passes a mask (text padding), which the kernels leave to exact attention;
#: "attention_padded": those masks are key-padding masks: QuantizedAttention applies them inside its
#: kernel, SparseAttention leaves the masked calls to exact attention
METHODS = ("sada", "bottleneck", "tokens", "sada_tokens", "attention")
SUPPORT: dict[str, set[str]] = {
    "flux": {"sada", "bottleneck", "attention"},
    "sd3": {"sada", "bottleneck", "attention"},
    "pixart_sigma": {"sada", "tokens", "attention"},
    "sana": {"sada", "attention_masked"},  # linear self-attention; masked cross-attention
    "wan": {"sada", "bottleneck", "attention"},
    "cogvideox": {"attention"},  # no SADA: CogVideoXDDIMScheduler: SADA reads Euler, DPM++, DDIM and flow Euler
    "hunyuan_video": {"sada", "bottleneck", "attention_padded"},
    "sd": {"sada", "tokens", "sada_tokens", "attention"},
    "sdxl": {"sada", "tokens", "sada_tokens", "attention"},
    "chroma": {"sada", "attention_masked"},
    "auraflow": {"sada", "attention"},
    "bria": {"sada", "attention"},
    "cogview3plus": {"attention"},  # no SADA: CogVideoXDDIMScheduler
    "cogview4": {"sada", "attention"},
    "lumina2": {"sada", "attention"},
    "z_image": {"sada", "attention"},
    "qwen_image": {"sada", "attention"},
    "ltx_video": {"sada", "attention"},
    "mochi": {"sada", "attention"},
    "allegro": {"attention"},  # no SADA: EulerAncestralDiscreteScheduler (stochastic)
    "skyreels_v2": {"attention"},  # no SADA: UniPCMultistepScheduler
    "flux2": {"sada", "attention"},
    "hunyuan_image": {"sada", "attention_padded"},
}
#: README rows: family -> (what users know it as, the pipeline tested)
NAMES: dict[str, tuple[str, str]] = {
    "flux": ("FLUX.1 (dev/schnell, Kontext, Fill)", "FluxPipeline"),
    "sd3": ("Stable Diffusion 3 / 3.5", "StableDiffusion3Pipeline"),
    "pixart_sigma": ("PixArt-α / Σ", "PixArtSigmaPipeline"),
    "sana": ("Sana", "SanaPipeline"),
    "wan": ("Wan 2.1 / 2.2 (two experts)", "WanPipeline"),
    "cogvideox": ("CogVideoX", "CogVideoXPipeline"),
    "hunyuan_video": ("HunyuanVideo", "HunyuanVideoPipeline"),
    "sd": ("Stable Diffusion 1.x / 2.x", "StableDiffusionPipeline"),
    "sdxl": ("SDXL", "StableDiffusionXLPipeline"),
    "chroma": ("Chroma", "ChromaPipeline"),
    "auraflow": ("AuraFlow", "AuraFlowPipeline"),
    "bria": ("Bria 3.2", "BriaPipeline"),
    "cogview3plus": ("CogView3-Plus", "CogView3PlusPipeline"),
    "cogview4": ("CogView4", "CogView4Pipeline"),
    "lumina2": ("Lumina-Image 2.0", "Lumina2Pipeline"),
    "z_image": ("Z-Image", "ZImagePipeline"),
    "qwen_image": ("Qwen-Image", "QwenImagePipeline"),
    "ltx_video": ("LTX-Video", "LTXPipeline"),
    "mochi": ("Mochi 1", "MochiPipeline"),
    "allegro": ("Allegro", "AllegroPipeline"),
    "skyreels_v2": ("SkyReels-V2", "SkyReelsV2Pipeline"),
    "flux2": ("FLUX.2 [klein]", "Flux2KleinPipeline"),
    "hunyuan_image": ("HunyuanImage 2.1", "HunyuanImagePipeline"),
}


def support_table() -> str:
    """The README's table: one row per family, one column per method."""
    head = "| family | pipeline tested | caches | SADA | bottleneck | ToMe / ToDo | SADA tokens | attention kernels |"
    rows = [head, "|---|---|:-:|:-:|:-:|:-:|:-:|:-:|"]
    for family, (name, pipeline) in NAMES.items():
        cells = ["✓"] + ["✓" if m in SUPPORT[family] else "–" for m in METHODS]
        if "attention_masked" in SUPPORT[family]:
            cells[-1] = "exact (masked)"
        if "attention_padded" in SUPPORT[family]:
            cells[-1] = "quantized; sparse exact (masked)"
        rows.append(f"| {name} | `{pipeline}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def test_the_table_covers_every_family_and_the_readme_shows_it():
    assert set(SUPPORT) == set(FAMILIES) == set(NAMES)
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    assert support_table() in readme, "README.md's support table is out of date:\n" + support_table()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pipe(request):
    family = request.param
    pipe = FAMILIES[family]()
    return family, pipe, run(pipe, family, num_inference_steps=STEPS)


def _runs(pipe, family, base, exact, skipping, count) -> None:
    """``exact`` is bit-identical; ``skipping`` changes the output and ``count(stats)`` > 0; remove()
    restores the pipeline."""
    with diffboost.accelerated(pipe, exact):
        assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base), f"{family}: {exact}"
    with diffboost.accelerated(pipe, skipping):
        out = run(pipe, family, num_inference_steps=STEPS)
        stats = diffboost.describe(pipe)["last_call"]
    assert out.shape == base.shape and torch.isfinite(out.float()).all()
    assert not torch.equal(out, base) and count(stats) > 0, f"{family}: {skipping} skipped nothing: {stats}"
    assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base), f"{family}: remove() after {skipping}"


def _refuses(pipe, plugin, why: str) -> None:
    with pytest.raises(UnsupportedPipelineError, match=why):
        diffboost.apply(pipe, plugin)
    assert not hasattr(pipe, "_diffboost_handle")


def test_sada(family_pipe):
    family, pipe, base = family_pipe
    if "sada" in SUPPORT[family]:
        _runs(pipe, family, base, SADA(schedule=()), SADA(schedule=(3, 5)),
              lambda stats: sum(s.get("skipped", 0) for s in stats))
    else:
        _refuses(pipe, SADA(), "SADA")


def test_bottleneck(family_pipe):
    family, pipe, base = family_pipe
    if "bottleneck" in SUPPORT[family]:
        _runs(pipe, family, base, BottleneckSampling(stages=[(1.0, 1.0)]), BottleneckSampling(),
              lambda stats: sum(st["steps"] for s in stats for st in s.get("stages", [])
                                if st["latent_size"] != s["stages"][-1]["latent_size"]))
    else:
        _refuses(pipe, BottleneckSampling(), "BottleneckSampling supports flow-matching")


def test_token_merging_and_downsampling(family_pipe):
    family, pipe, base = family_pipe
    if "tokens" in SUPPORT[family]:
        count = lambda stats: sum(s.get("reduced_calls", 0) for s in stats)  # noqa: E731
        # the tiny UNets attend at their second level only (downsampled 2x)
        _runs(pipe, family, base, TokenMerging(ratio=0.0, max_downsample=8), TokenMerging(ratio=0.5, max_downsample=2), count)
        _runs(pipe, family, base, TokenDownsampling(factor=1, max_downsample=8),
              TokenDownsampling(factor=2, max_downsample=2), count)
    else:
        _refuses(pipe, TokenMerging(), "supports the families")
        _refuses(pipe, TokenDownsampling(), "supports the families")


def test_sada_token_sparsity(family_pipe):
    family, pipe, base = family_pipe
    if "sada_tokens" in SUPPORT[family]:
        _runs(pipe, family, base, SADA(acc_range=(0, 0), token_sparsity=True, token_max_downsample=2),
              SADA(schedule=(), acc_range=(3, STEPS), max_consecutive_skips=4, token_sparsity=True, token_max_downsample=2),
              lambda stats: sum(s.get("token_pruned_calls", 0) for s in stats))
    elif "sada" in SUPPORT[family]:
        _refuses(pipe, SADA(token_sparsity=True), "token")
    else:
        _refuses(pipe, SADA(token_sparsity=True), "SADA")


def test_attention_kernels(family_pipe):
    family, pipe, base = family_pipe
    if "attention" in SUPPORT[family]:
        count = lambda stats: sum(s.get("kernel_calls", 0) for s in stats)  # noqa: E731
        _runs(pipe, family, base, SparseAttention(cdf_threshold=1.0), QuantizedAttention(), count)
        _runs(pipe, family, base, SparseAttention(cdf_threshold=1.0),
              SparseAttention(cdf_threshold=0.3, sim_threshold=-1.0, block_q=4, block_k=4), count)
    elif "attention_padded" in SUPPORT[family]:
        count = lambda stats: sum(s.get("kernel_calls", 0) for s in stats)  # noqa: E731
        _runs(pipe, family, base, SparseAttention(cdf_threshold=0.3, sim_threshold=-1.0, block_q=4, block_k=4),
              QuantizedAttention(), count)
    elif "attention_masked" in SUPPORT[family]:
        with diffboost.accelerated(pipe, QuantizedAttention()):
            assert torch.equal(run(pipe, family, num_inference_steps=STEPS), base)
            stats = diffboost.describe(pipe)["last_call"]
        assert sum(s["kernel_calls"] for s in stats) == 0 and sum(s["exact_calls"] for s in stats) > 0
    else:
        _refuses(pipe, QuantizedAttention(), "no attention processor diffboost can route")
        _refuses(pipe, SparseAttention(), "no attention processor diffboost can route")
