"""diffboost/plugins/adapters.py: block input/output layouts, family detection, block collection.
Stub modules only (detection reads class names), no pipeline."""

from __future__ import annotations

from types import SimpleNamespace

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
    assert supported_families() == ["flux", "sd3", "pixart", "sana", "wan", "cogvideox", "hunyuan_video", "sd", "sdxl"]
    cfg = {f.name: f.cfg for f in FAMILIES}
    assert cfg == {
        "flux": "context", "sd3": "batch", "pixart": "batch", "sana": "batch", "wan": "context",
        "cogvideox": "batch", "hunyuan_video": "embedded", "sd": "batch",
    }
    assert [f.name for f in FAMILIES if f.kind == "unet"] == ["sd"]
    assert [f.name for f in FAMILIES if f.video] == ["wan", "cogvideox", "hunyuan_video"]


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
        "diffboost does not support Odd (denoiser: MysteryTransformer); supported families: "
        "flux, sd3, pixart, sana, wan, cogvideox, hunyuan_video, sd, sdxl"
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
    with pytest.raises(UnsupportedPipelineError, match=r"^block class Weird of MyDiT has no known output layout; known: \["):
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
