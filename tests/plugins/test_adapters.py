"""diffboost/plugins/adapters.py: block input/output layouts, family detection, block collection.
Stub modules only (detection reads class names), no pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import re

import pytest
import torch

from diffboost.plugins.adapters import (
    BLOCK_OUTPUTS,
    FAMILIES,
    BlockIO,
    Denoiser,
    PipelineAdapter,
    UnsupportedPipelineError,
    _collect_blocks,
    supported_families,
)

H, E = torch.ones(1, 2, 3), torch.zeros(1, 4, 3)


def test_block_io_inputs():
    assert BlockIO("h").inputs((H, E), {}) == (H, None)
    for layout in ("eh", "he"):
        io = BlockIO(layout)
        assert io.inputs((H, E), {}) == (H, E)
        assert io.inputs((), {"hidden_states": H, "encoder_hidden_states": E}) == (H, E)
        assert io.inputs((H,), {"encoder_hidden_states": E}) == (H, E)
        assert io.inputs((H,), {}) == (H, None)
        assert io.inputs((), {"hidden_states": H}) == (H, None)


def test_block_io_split_and_join():
    assert BlockIO("h").split(H) == (H, None) and BlockIO("h").split((H,)) == (H, None)
    assert BlockIO("eh").split((E, H)) == (H, E) and BlockIO("he").split((H, E)) == (H, E)
    assert BlockIO("h").join(H, None) is H
    assert BlockIO("eh").join(H, E) == (E, H) and BlockIO("he").join(H, E) == (H, E)


def test_block_layouts():
    assert BLOCK_OUTPUTS["FluxTransformerBlock"] == BLOCK_OUTPUTS["JointTransformerBlock"] == "eh"
    assert BLOCK_OUTPUTS["CogVideoXBlock"] == BLOCK_OUTPUTS["HunyuanVideoTransformerBlock"] == "he"
    assert BLOCK_OUTPUTS["BasicTransformerBlock"] == BLOCK_OUTPUTS["WanTransformerBlock"] == "h"


def named(cls_name: str, **attrs) -> torch.nn.Module:
    """A module whose class has the given name (detection reads class names), with attributes."""
    module = type(cls_name, (torch.nn.Module,), {})()
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def test_supported_families_and_specs():
    assert supported_families() == [
        "flux", "sd3", "pixart", "sana", "wan", "cogvideox", "hunyuan_video", "sd", "sdxl", "chroma", "auraflow",
        "bria", "cogview3plus", "cogview4", "lumina2", "z_image", "qwen_image", "ltx_video", "mochi", "allegro",
        "skyreels_v2", "flux2", "hunyuan_image",
    ]
    assert len(supported_families()) >= 20
    cfg = {f.name: f.cfg for f in FAMILIES}
    # how each runs CFG, measured on its tiny pipeline (tests/test_factories.py::test_guidance_layout)
    assert cfg == {
        "flux": "context", "sd3": "batch", "pixart": "batch", "sana": "batch", "wan": "context",
        "cogvideox": "batch", "hunyuan_video": "embedded", "sd": "batch", "chroma": "calls", "auraflow": "batch",
        "bria": "batch", "cogview3plus": "batch", "cogview4": "context", "lumina2": "calls", "z_image": "batch",
        "qwen_image": "context", "ltx_video": "batch", "mochi": "batch", "allegro": "batch", "skyreels_v2": "context",
        "flux2": "context", "hunyuan_image": "context",
    }
    assert [f.name for f in FAMILIES if f.kind == "unet"] == ["sd"]
    assert [f.name for f in FAMILIES if f.video] == [
        "wan", "cogvideox", "hunyuan_video", "ltx_video", "mochi", "allegro", "skyreels_v2"
    ]


def test_detection_by_denoiser_class():
    unet = named("UNet2DConditionModel", config=SimpleNamespace(addition_embed_type=None))
    assert PipelineAdapter(SimpleNamespace(unet=unet)).family == "sd"
    unet.config = SimpleNamespace(addition_embed_type="text_time")
    adapter = PipelineAdapter(SimpleNamespace(unet=unet))
    assert adapter.family == "sdxl" and adapter.spec.name == "sd" and adapter.kind == "unet"
    dit = named("WanTransformer3DModel", blocks=torch.nn.ModuleList([named("WanTransformerBlock")] * 1))
    expert = named("WanTransformer3DModel", blocks=torch.nn.ModuleList())
    other = named("SomethingElse")
    adapter = PipelineAdapter(SimpleNamespace(transformer=dit, transformer_2=expert, unet=other, scheduler=None))
    assert adapter.family == "wan" and adapter.kind == "dit"
    assert [(d.attr, d.module, d.block_names) for d in adapter] == [
        ("transformer", dit, ["blocks.0"]),
        ("transformer_2", expert, []),
    ]


def test_unsupported_pipeline_message():
    class Odd:
        transformer = named("MysteryTransformer")

    with pytest.raises(UnsupportedPipelineError) as err:
        PipelineAdapter(Odd())
    assert str(err.value) == (
        "diffboost does not support Odd (denoiser: MysteryTransformer): no known family and no block list with "
        "known blocks was found; supported families: flux, sd3, pixart, sana, wan, cogvideox, hunyuan_video, sd, "
        "sdxl, chroma, auraflow, bria, cogview3plus, cogview4, lumina2, z_image, qwen_image, ltx_video, mochi, "
        "allegro, skyreels_v2, flux2, hunyuan_image; a custom model can be added with diffboost.register_family(...)"
    )
    assert issubclass(UnsupportedPipelineError, TypeError)


def test_collect_blocks():
    a, b, mid = named("A"), named("B"), named("Mid")
    module = named("M", down=torch.nn.ModuleList([a, b]), mid=mid, up=torch.nn.ModuleList())
    assert _collect_blocks(module, ("down", "missing", "mid", "up")) == ([a, b, mid], ["down.0", "down.1", "mid"])
    module.mid = None
    assert _collect_blocks(module, ("mid", "down")) == ([a, b], ["down.0", "down.1"])


def test_unknown_block_layout_is_refused():
    d = Denoiser("transformer", named("MyDiT"), [], [])
    assert d.block_io(named("CogVideoXBlock")) == BlockIO("he")
    with pytest.raises(UnsupportedPipelineError, match=r"^block class Weird of MyDiT has no known output layout .* "
                       r"register it with diffboost.register_family\(\.\.\., block_outputs=\{Weird: 'h' \| 'eh' \| 'he'\}\)"):
        d.block_io(named("Weird"))


@pytest.mark.parametrize(
    "scheduler, flow",
    [
        (named("FlowMatchEulerDiscreteScheduler"), True),
        (named("DPMSolverMultistepScheduler", config=SimpleNamespace(use_flow_sigmas=True)), True),
        (named("DPMSolverMultistepScheduler", config=SimpleNamespace(use_flow_sigmas=False)), False),
        (named("DDIMScheduler"), False),
        (None, False),
    ],
)
def test_flow_matching_is_read_from_the_scheduler(scheduler, flow):
    dit = named("FluxTransformer2DModel")
    adapter = PipelineAdapter(SimpleNamespace(transformer=dit, scheduler=scheduler))
    assert adapter.is_flow_matching is flow
    assert adapter.describe() == {
        "pipeline": "SimpleNamespace",
        "family": "flux",
        "denoisers": {"transformer": "FluxTransformer2DModel (0 blocks)"},
        "scheduler": type(scheduler).__name__,
        "flow_matching": flow,
        "cfg": "context",
    }


# ----------------------------------------------------------------------------------------------
# families beyond the table: subclasses, diffusers' block metadata, discovery, user registration
# ----------------------------------------------------------------------------------------------


def test_diffusers_block_metadata_on_this_version():
    """diffboost reads diffusers' private block registry in one function; checked on diffusers 0.42.1.
    If this fails after a diffusers upgrade, re-check ``diffusers_block_metadata``."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock
    from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from diffboost.plugins.adapters import diffusers_block_metadata

    assert diffusers_block_metadata(FluxTransformerBlock) == BlockIO("eh")
    assert diffusers_block_metadata(QwenImageTransformerBlock) == BlockIO("eh")
    assert diffusers_block_metadata(WanTransformerBlock) == BlockIO("h")
    assert diffusers_block_metadata(LTXVideoTransformerBlock) == BlockIO("h")
    assert diffusers_block_metadata(MochiTransformerBlock) == BlockIO("he")
    assert diffusers_block_metadata(torch.nn.Linear) is None


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int = 8):
        torch.nn.Module.__init__(self)  # (subclasses below mix in diffusers blocks without their __init__)
        self.norm = torch.nn.LayerNorm(dim)
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states, temb):
        return hidden_states + self.lin(self.norm(hidden_states)) * temb


class ToyTransformer2DModel(torch.nn.Module):
    """A user's own DiT: not a diffusers class, blocks diffboost has never seen."""

    block = ToyBlock

    def __init__(self, dim: int = 8, n: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj_in = torch.nn.Linear(4, dim)
        self.blocks = torch.nn.ModuleList([self.block(dim) for _ in range(n)])
        self.proj_out = torch.nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep):
        temb = torch.sigmoid(timestep)[:, None, None]
        h = self.proj_in(hidden_states)
        for block in self.blocks:
            h = block(hidden_states=h, temb=temb)
        return (self.proj_out(h),)


class ToyPipeline:
    def __init__(self, model_class=ToyTransformer2DModel):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = model_class()
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    @torch.no_grad()
    def __call__(self, steps: int = 10, seed: int = 0):
        x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(seed))
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            v = self.transformer(hidden_states=x, timestep=(t / 1000).expand(1))[0]
            x = self.scheduler.step(v, t, x).prev_sample
        return x


def test_a_user_registered_family_works_like_a_built_in_one():
    import diffboost
    from diffboost import AdaptiveBlockCache, TaylorSeer

    pipe = ToyPipeline()
    base = pipe()
    with pytest.raises(UnsupportedPipelineError, match=r"denoiser: ToyTransformer2DModel.*register_family"):
        diffboost.apply(pipe, AdaptiveBlockCache())
    diffboost.register_family("toy", ToyTransformer2DModel, ["blocks"], block_outputs={ToyBlock: "h"})
    try:
        assert "toy" in diffboost.supported_families()
        for never in (AdaptiveBlockCache(threshold=0.0, warmup=0), TaylorSeer(interval=1, granularity="block"),
                      TaylorSeer(interval=1, lite=True)):
            with diffboost.accelerated(pipe, never):
                assert torch.equal(pipe(), base), never
                info = diffboost.describe(pipe)
            assert info["family"] == "toy" and info["denoisers"] == {"transformer": "ToyTransformer2DModel (4 blocks)"}
        with diffboost.accelerated(pipe, AdaptiveBlockCache(threshold=10.0, warmup=2, max_consecutive_skips=8)):
            fast = pipe()
            (entry,) = diffboost.describe(pipe)["last_call"]
        assert not torch.equal(fast, base)
        assert entry["branches"]["default"]["full_steps"] == [0, 1]  # every step after the warm-up reused
        assert torch.equal(pipe(), base)  # removed
    finally:
        diffboost.unregister_family("toy")
    assert "toy" not in diffboost.supported_families()


def test_an_unknown_dit_with_blocks_diffusers_knows_is_discovered():
    """No registration: the block lists are found from diffusers' block metadata (here the blocks are
    subclasses of LTX-Video's, which diffusers records as returning hidden states only)."""
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock

    import diffboost
    from diffboost import AdaptiveBlockCache

    class LtxLikeBlock(ToyBlock, LTXVideoTransformerBlock):
        pass

    class MysteryTransformer2DModel(ToyTransformer2DModel):
        block = LtxLikeBlock

    pipe = ToyPipeline(MysteryTransformer2DModel)
    base = pipe()
    adapter = PipelineAdapter(pipe)
    assert adapter.family == "mystery" and adapter.spec.discovered and adapter.spec.block_lists == ("blocks",)
    with diffboost.accelerated(pipe, AdaptiveBlockCache(threshold=0.0, warmup=0)):
        assert torch.equal(pipe(), base)
    with diffboost.accelerated(pipe, AdaptiveBlockCache(threshold=10.0, warmup=2)):
        assert not torch.equal(pipe(), base)
    assert "mystery" not in diffboost.supported_families()  # discovered, not registered


def test_a_subclass_of_a_known_denoiser_is_its_family():
    from diffusers import FluxTransformer2DModel

    import diffboost
    from diffboost import TaylorSeer
    from factories import make_flux, run

    pipe = make_flux()
    base = run(pipe, "flux", num_inference_steps=4)

    class MyFlux(FluxTransformer2DModel):
        pass

    mine = MyFlux.from_config(pipe.transformer.config)
    mine.load_state_dict(pipe.transformer.state_dict())
    pipe.transformer = mine
    assert PipelineAdapter(pipe).family == "flux"
    with diffboost.accelerated(pipe, TaylorSeer(interval=1)):
        assert torch.equal(run(pipe, "flux", num_inference_steps=4), base)


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": "flux"}, "one of diffboost's own families"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"block_lists": []}, "block_lists must name"),
    ({"block_lists": "blocks"}, "block_lists must name"),
    ({"kind": "rnn"}, "kind='rnn'; choose one of ('dit', 'unet')"),
    ({"cfg": "double"}, "cfg='double'; choose one of"),
    ({"block_outputs": {ToyBlock: "hh"}}, "layouts are ('eh', 'he', 'h')"),
    ({"denoiser_class": 3}, "denoiser_class must be a class or a class name"),
])
def test_register_family_checks_its_arguments(kwargs, needle):
    import diffboost

    args = {"name": "toy2", "denoiser_class": ToyTransformer2DModel, "block_lists": ("blocks",), **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(needle)):
        diffboost.register_family(args.pop("name"), args.pop("denoiser_class"), args.pop("block_lists"), **args)
    assert "toy2" not in diffboost.supported_families()


def test_unregistering_forgets_the_block_layouts_too():
    import diffboost
    from diffboost.plugins.adapters import block_layout

    assert block_layout(ToyBlock) is None
    diffboost.register_family("toy3", ToyTransformer2DModel, ["blocks"], block_outputs={"ToyBlock": "eh"})
    try:
        assert block_layout(ToyBlock) == BlockIO("eh")
    finally:
        diffboost.unregister_family("toy3")
    assert block_layout(ToyBlock) is None


def test_a_refused_taylorseer_leaves_no_hook_behind():
    """Module-granularity TaylorSeer needs attention/feed-forward children; a model without them is
    refused before any hook is registered, so that another configuration can be applied next."""
    import diffboost
    from diffboost import TaylorSeer

    pipe = ToyPipeline()
    base = pipe()
    diffboost.register_family("toy", ToyTransformer2DModel, ["blocks"], block_outputs={ToyBlock: "h"})
    try:
        with pytest.raises(ValueError, match=r"found no attention/feed-forward modules .*granularity='block'"):
            diffboost.apply(pipe, TaylorSeer())
        for module in pipe.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            assert (registry is None or not registry.hooks) and "forward" not in vars(module)
        assert not hasattr(pipe, "_diffboost_handle") and "set_timesteps" not in vars(pipe.scheduler)
        with diffboost.accelerated(pipe, TaylorSeer(interval=1, granularity="block")):
            assert torch.equal(pipe(), base)
    finally:
        diffboost.unregister_family("toy")
