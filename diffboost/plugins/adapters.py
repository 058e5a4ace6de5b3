"""Pipeline adapters: what a plugin needs to know about a pipeline, discovered once.

A pipeline is recognised by its *denoiser* class (the transformer or UNet), so that text-to-image,
image-to-image and other variants of a family share one adapter. For each family we record:

- the denoiser attribute(s) on the pipeline (Wan 2.2 has two experts: ``transformer`` and
  ``transformer_2``),
- the block lists (``transformer_blocks`` + ``single_transformer_blocks`` for Flux, the
  down/mid/up blocks for UNets),
- for each block class, the order of its outputs (``"eh"`` = (encoder, hidden), ``"he"``,
  ``"h"`` = hidden only),
- the denoiser kind (``"dit"`` or ``"unet"``) and the scheduler kind (flow matching or eps/v
  prediction, read from the scheduler),
- how classifier-free guidance is batched (``"context"``: separate calls under
  ``cache_context("cond"/"uncond")``, ``"batch"``: one doubled batch, ``"embedded"``: guidance
  distilled into an embedding, no second branch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str
    denoiser_class: str
    block_lists: tuple[str, ...]
    kind: str  # "dit" | "unet"
    cfg: str  # "context" | "batch" | "embedded"
    video: bool = False


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("flux", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "dit", "context"),
    FamilySpec("sd3", "SD3Transformer2DModel", ("transformer_blocks",), "dit", "batch"),
    FamilySpec("pixart", "PixArtTransformer2DModel", ("transformer_blocks",), "dit", "batch"),
    FamilySpec("sana", "SanaTransformer2DModel", ("transformer_blocks",), "dit", "batch"),
    FamilySpec("wan", "WanTransformer3DModel", ("blocks",), "dit", "context", video=True),
    FamilySpec("cogvideox", "CogVideoXTransformer3DModel", ("transformer_blocks",), "dit", "batch", video=True),
    FamilySpec(
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        ("transformer_blocks", "single_transformer_blocks"),
        "dit",
        "embedded",
        video=True,
    ),
    FamilySpec("sd", "UNet2DConditionModel", ("down_blocks", "mid_block", "up_blocks"), "unet", "batch"),
)

#: Output order of transformer blocks: "eh" (encoder, hidden), "he" (hidden, encoder), "h".
BLOCK_OUTPUTS: dict[str, str] = {
    "FluxTransformerBlock": "eh",
    "FluxSingleTransformerBlock": "eh",
    "JointTransformerBlock": "eh",
    "BasicTransformerBlock": "h",
    "SanaTransformerBlock": "h",
    "WanTransformerBlock": "h",
    "CogVideoXBlock": "he",
    "HunyuanVideoTransformerBlock": "he",
    "HunyuanVideoSingleTransformerBlock": "he",
    "HunyuanVideoTokenReplaceTransformerBlock": "he",
    "HunyuanVideoTokenReplaceSingleTransformerBlock": "he",
}


def supported_families() -> list[str]:
    return [f.name for f in FAMILIES] + ["sdxl"]


class UnsupportedPipelineError(TypeError):
    """The pipeline (or model) is not one diffboost knows how to patch."""


@dataclasses.dataclass
class BlockIO:
    """How to read a transformer block's hidden/encoder inputs and build its output."""

    outputs: str  # "eh" | "he" | "h"

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) inputs; encoder is None for blocks that do not return a text stream
        (their ``encoder_hidden_states`` is read-only conditioning, and may not be argument 1)."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.outputs == "h":
            return hidden, None
        if "encoder_hidden_states" in kwargs:
            encoder = kwargs["encoder_hidden_states"]
        else:
            encoder = args[1] if len(args) > 1 else None
        return hidden, encoder

    def split(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.outputs == "h":
            return (output[0] if isinstance(output, tuple) else output), None
        if self.outputs == "eh":
            return output[1], output[0]
        return output[0], output[1]

    def join(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if self.outputs == "h":
            return hidden
        if self.outputs == "eh":
            return encoder, hidden
        return hidden, encoder


@dataclasses.dataclass
class Denoiser:
    """One denoiser of a pipeline and its blocks."""

    attr: str
    module: torch.nn.Module
    blocks: list[torch.nn.Module]
    block_names: list[str]

    def block_io(self, block: torch.nn.Module) -> BlockIO:
        name = type(block).__name__
        if name not in BLOCK_OUTPUTS:
            raise UnsupportedPipelineError(
                f"block class {name} of {type(self.module).__name__} has no known output layout; "
                f"known: {sorted(BLOCK_OUTPUTS)}"
            )
        return BlockIO(BLOCK_OUTPUTS[name])


class PipelineAdapter:
    """What diffboost knows about one pipeline instance."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.family, self.spec = _detect(pipe)
        self.denoisers: list[Denoiser] = []
        for attr in ("transformer", "transformer_2", "unet"):
            module = getattr(pipe, attr, None)
            if isinstance(module, torch.nn.Module) and type(module).__name__ == self.spec.denoiser_class:
                blocks, names = _collect_blocks(module, self.spec.block_lists)
                self.denoisers.append(Denoiser(attr, module, blocks, names))
        self.scheduler = getattr(pipe, "scheduler", None)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def is_flow_matching(self) -> bool:
        name = type(self.scheduler).__name__
        if "FlowMatch" in name:
            return True
        return bool(getattr(getattr(self.scheduler, "config", None), "use_flow_sigmas", False))

    def __iter__(self) -> Iterator[Denoiser]:
        return iter(self.denoisers)

    def describe(self) -> dict[str, Any]:
        return {
            "pipeline": type(self.pipe).__name__,
            "family": self.family,
            "denoisers": {d.attr: f"{type(d.module).__name__} ({len(d.blocks)} blocks)" for d in self.denoisers},
            "scheduler": type(self.scheduler).__name__,
            "flow_matching": self.is_flow_matching,
            "cfg": self.spec.cfg,
        }


def _detect(pipe: Any) -> tuple[str, FamilySpec]:
    for attr in ("transformer", "unet"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        cls = type(module).__name__
        for spec in FAMILIES:
            if spec.denoiser_class == cls:
                family = spec.name
                if cls == "UNet2DConditionModel" and getattr(module.config, "addition_embed_type", None) == "text_time":
                    family = "sdxl"
                return family, spec
    raise UnsupportedPipelineError(
        f"diffboost does not support {type(pipe).__name__} "
        f"(denoiser: {type(getattr(pipe, 'transformer', getattr(pipe, 'unet', None))).__name__}); "
        f"supported families: {', '.join(supported_families())}"
    )


def _collect_blocks(module: torch.nn.Module, lists: tuple[str, ...]) -> tuple[list[torch.nn.Module], list[str]]:
    blocks: list[torch.nn.Module] = []
    names: list[str] = []
    for attr in lists:
        value = getattr(module, attr, None)
        if value is None:
            continue
        if isinstance(value, torch.nn.ModuleList):
            for i, b in enumerate(value):
                blocks.append(b)
                names.append(f"{attr}.{i}")
        else:
            blocks.append(value)
            names.append(attr)
    return blocks, names
