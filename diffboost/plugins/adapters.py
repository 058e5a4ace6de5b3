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
  ``cache_context("cond"/"uncond")``, ``"calls"``: separate calls the pipeline does not name (the
  runtime names them by their order within a step), ``"batch"``: one doubled batch, ``"embedded"``: guidance
  distilled into an embedding, no second branch; ``"auto"``: not recorded, the runtime follows what
  the pipeline does).

A denoiser matches a family through its class hierarchy (a subclass of ``FluxTransformer2DModel``
is Flux). A transformer denoiser of no known family is *discovered*: its block lists are the
``ModuleList`` children whose blocks all have a known output layout (ours, or diffusers' own block
metadata), in the order the model defines them. Users register their own models with
:func:`register_family`.
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
    cfg: str  # "context" | "batch" | "embedded" | "auto"
    video: bool = False
    #: found by discovery (block lists read from the model), not from a table
    discovered: bool = False
    #: (block class name, layout) pairs registered with the family
    block_outputs: tuple[tuple[str, str], ...] = ()


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
    # dual-stream blocks, then single-stream blocks on the joined cat([text, image]) stream
    FamilySpec("chroma", "ChromaTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "dit", "calls"),
    FamilySpec("auraflow", "AuraFlowTransformer2DModel", ("joint_transformer_blocks", "single_transformer_blocks"), "dit", "batch"),
    FamilySpec("bria", "BriaTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "dit", "batch"),
    FamilySpec("cogview3plus", "CogView3PlusTransformer2DModel", ("transformer_blocks",), "dit", "batch"),
    FamilySpec("cogview4", "CogView4Transformer2DModel", ("transformer_blocks",), "dit", "context"),
    # the caption / noise refiners run on separate streams before the main stack: not cached
    FamilySpec("lumina2", "Lumina2Transformer2DModel", ("layers",), "dit", "calls"),
    FamilySpec("z_image", "ZImageTransformer2DModel", ("layers",), "dit", "batch"),
    FamilySpec("qwen_image", "QwenImageTransformer2DModel", ("transformer_blocks",), "dit", "context"),
    FamilySpec("ltx_video", "LTXVideoTransformer3DModel", ("transformer_blocks",), "dit", "batch", video=True),
    FamilySpec("mochi", "MochiTransformer3DModel", ("transformer_blocks",), "dit", "batch", video=True),
    FamilySpec("allegro", "AllegroTransformer3DModel", ("transformer_blocks",), "dit", "batch", video=True),
    FamilySpec("skyreels_v2", "SkyReelsV2Transformer3DModel", ("blocks",), "dit", "context", video=True),
    # FLUX.2: dual-stream blocks, then single-stream blocks on the joined stream (diffusers' metadata)
    FamilySpec("flux2", "Flux2Transformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "dit", "context"),
    FamilySpec(
        "hunyuan_image", "HunyuanImageTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "dit", "context"
    ),
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
    "ChromaTransformerBlock": "eh",
    "ChromaSingleTransformerBlock": "h",  # the joined stream in, the joined stream out
    "AuraFlowJointTransformerBlock": "eh",
    "AuraFlowSingleTransformerBlock": "h",  # the joined stream
    # diffusers 0.42.1's block metadata says hidden-only; the block returns (encoder, hidden)
    "BriaTransformerBlock": "eh",
    "BriaSingleTransformerBlock": "eh",
    "CogView3PlusTransformerBlock": "he",
    "Lumina2TransformerBlock": "h",
    "AllegroTransformerBlock": "h",
    "SkyReelsV2TransformerBlock": "h",
}


#: families registered with :func:`register_family` (module state, never on a class), newest first
_REGISTERED: list[FamilySpec] = []

LAYOUTS = ("eh", "he", "h")
KINDS = ("dit", "unet")
CFG_MODES = ("context", "calls", "batch", "embedded", "auto")


def supported_families() -> list[str]:
    """The families diffboost knows by name: its own table (with SDXL), then registered ones.
    Transformer denoisers of other classes may still work through discovery."""
    names = [f.name for f in FAMILIES]
    names.insert(names.index("sd") + 1, "sdxl")  # the SD UNet with a text_time embedding
    return names + [f.name for f in _REGISTERED]


def register_family(
    name: str,
    denoiser_class: type | str,
    block_lists: tuple[str, ...] | list[str],
    *,
    kind: str = "dit",
    cfg: str = "auto",
    video: bool = False,
    block_outputs: dict[type | str, str] | None = None,
) -> FamilySpec:
    """Teach diffboost a denoiser family (a custom model, or one that discovery gets wrong).

    Args:
        name: the family's name in ``describe()`` and error messages.
        denoiser_class: the denoiser class (or its name); subclasses match too.
        block_lists: the denoiser's attributes that hold its blocks, in the order they run
            (``ModuleList``s, or single blocks).
        kind: ``"dit"`` (transformer blocks) or ``"unet"``.
        cfg: how the pipeline runs classifier-free guidance (descriptive: ``"context"``, ``"calls"``,
            ``"batch"``, ``"embedded"``; ``"auto"``: not known).
        video: whether the latents are video.
        block_outputs: the output layout of each block class that neither diffboost nor diffusers
            knows: ``"h"`` (hidden states only), ``"eh"`` (encoder, hidden) or ``"he"`` (hidden, encoder).

    Registering a name again replaces the earlier registration. Returns the family's spec.
    """
    cls_name = denoiser_class if isinstance(denoiser_class, str) else getattr(denoiser_class, "__name__", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_family: name must be a non-empty string, got {name!r}")
    if name in [f.name for f in FAMILIES] + ["sdxl"]:
        raise ValueError(f"register_family: {name!r} is one of diffboost's own families; choose another name")
    if not isinstance(cls_name, str) or not cls_name:
        raise TypeError(f"register_family: denoiser_class must be a class or a class name, got {denoiser_class!r}")
    lists = tuple(block_lists) if isinstance(block_lists, (list, tuple)) else ()
    if not lists or not all(isinstance(b, str) and b for b in lists):
        raise ValueError(f"register_family: block_lists must name the denoiser's block attributes, got {block_lists!r}")
    if kind not in KINDS:
        raise ValueError(f"register_family: kind={kind!r}; choose one of {KINDS}")
    if cfg not in CFG_MODES:
        raise ValueError(f"register_family: cfg={cfg!r}; choose one of {CFG_MODES}")
    outputs: dict[str, str] = {}
    for block, layout in (block_outputs or {}).items():
        block_name = block if isinstance(block, str) else getattr(block, "__name__", None)
        if not isinstance(block_name, str) or layout not in LAYOUTS:
            raise ValueError(f"register_family: block_outputs entry {block!r}: {layout!r}; layouts are {LAYOUTS}")
        outputs[block_name] = layout
    spec = FamilySpec(name, cls_name, lists, kind, cfg, video=bool(video), block_outputs=tuple(outputs.items()))
    _REGISTERED[:] = [f for f in _REGISTERED if f.name != name]
    _REGISTERED.insert(0, spec)
    return spec


def unregister_family(name: str) -> None:
    """Forget a family registered with :func:`register_family`, and the block layouts it brought."""
    _REGISTERED[:] = [f for f in _REGISTERED if f.name != name]


class UnsupportedPipelineError(TypeError):
    """The pipeline (or model) is not one diffboost knows how to patch."""


@dataclasses.dataclass
class BlockIO:
    """How to read a transformer block's hidden/encoder inputs and build its output."""

    outputs: str  # "eh" | "he" | "h"
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) inputs; encoder is None for blocks that do not return a text stream
        (their ``encoder_hidden_states`` is read-only conditioning, and may not be argument 1)."""
        hidden = kwargs[self.hidden_arg] if self.hidden_arg in kwargs else args[0]
        if self.outputs == "h":
            return hidden, None
        if self.encoder_arg in kwargs:
            encoder = kwargs[self.encoder_arg]
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


def diffusers_block_metadata(block_class: type) -> BlockIO | None:
    """The output layout diffusers records for a transformer block class, or None.

    The one place that reads diffusers' private block registry
    (``diffusers.hooks._helpers.TransformerBlockRegistry``, checked on diffusers 0.42.1:
    ``return_hidden_states_index``, ``return_encoder_hidden_states_index`` and the argument names);
    ``tests/plugins/test_adapters.py`` pins what it returns for known blocks.
    """
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # pragma: no cover - another diffusers layout
        return None
    try:
        meta = TransformerBlockRegistry.get(block_class)
    except (ValueError, KeyError, TypeError):
        return None
    hidden = getattr(meta, "return_hidden_states_index", None)
    encoder = getattr(meta, "return_encoder_hidden_states_index", None)
    layout = {(0, None): "h", (0, 1): "he", (1, 0): "eh"}.get((hidden, encoder))
    if layout is None:
        return None
    return BlockIO(
        layout,
        getattr(meta, "hidden_states_argument_name", None) or "hidden_states",
        getattr(meta, "encoder_hidden_states_argument_name", None) or "encoder_hidden_states",
    )


def block_layout(block_class: type) -> BlockIO | None:
    """A block class's layout: registered by a user, in diffboost's table, or in diffusers' metadata,
    looked up along the class hierarchy (a subclass of a known block is known)."""
    registered = {name: layout for spec in reversed(_REGISTERED) for name, layout in spec.block_outputs}
    for cls in block_class.__mro__:
        if cls.__name__ in registered:
            return BlockIO(registered[cls.__name__])
        if cls.__name__ in BLOCK_OUTPUTS:
            return BlockIO(BLOCK_OUTPUTS[cls.__name__])
        found = diffusers_block_metadata(cls)
        if found is not None:
            return found
    return None


@dataclasses.dataclass
class Denoiser:
    """One denoiser of a pipeline and its blocks."""

    attr: str
    module: torch.nn.Module
    blocks: list[torch.nn.Module]
    block_names: list[str]

    def block_io(self, block: torch.nn.Module) -> BlockIO:
        layout = block_layout(type(block))
        if layout is None:
            raise UnsupportedPipelineError(
                f"block class {type(block).__name__} of {type(self.module).__name__} has no known output layout "
                f"(neither diffboost's table nor diffusers' block metadata has it); register it with "
                f"diffboost.register_family(..., block_outputs={{{type(block).__name__}: 'h' | 'eh' | 'he'}})"
            )
        return layout


class PipelineAdapter:
    """What diffboost knows about one pipeline instance."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.family, self.spec = _detect(pipe)
        self.denoisers: list[Denoiser] = []
        for attr in ("transformer", "transformer_2", "unet"):
            module = getattr(pipe, attr, None)
            if isinstance(module, torch.nn.Module) and _matches(module, self.spec):
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


def _matches(module: torch.nn.Module, spec: FamilySpec) -> bool:
    return any(cls.__name__ == spec.denoiser_class for cls in type(module).__mro__)


def _family_name(cls_name: str) -> str:
    """``ChromaTransformer2DModel`` -> ``chroma``: a discovered family's name."""
    for suffix in ("Transformer2DModel", "Transformer3DModel", "TransformerModel", "Transformer", "Model"):
        if cls_name.endswith(suffix) and len(cls_name) > len(suffix):
            cls_name = cls_name[: -len(suffix)]
            break
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(cls_name))


def discover_block_lists(module: torch.nn.Module) -> tuple[str, ...]:
    """The ``ModuleList`` children of a transformer whose blocks all have a known layout, in the
    order the model defines them (how diffusers' DiTs run them)."""
    found = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and all(block_layout(type(b)) for b in child):
            found.append(name)
    return tuple(found)


def _detect(pipe: Any) -> tuple[str, FamilySpec]:
    for attr in ("transformer", "unet"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        for spec in (*_REGISTERED, *FAMILIES):
            if _matches(module, spec):
                family = spec.name
                if spec.name == "sd" and getattr(module.config, "addition_embed_type", None) == "text_time":
                    family = "sdxl"
                return family, spec
    module = getattr(pipe, "transformer", None)
    if isinstance(module, torch.nn.Module):
        lists = discover_block_lists(module)
        if lists:
            cls_name = type(module).__name__
            spec = FamilySpec(_family_name(cls_name), cls_name, lists, "dit", "auto", discovered=True)
            return spec.name, spec
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    raise UnsupportedPipelineError(
        f"diffboost does not support {type(pipe).__name__} (denoiser: {type(denoiser).__name__}): no known "
        f"family and no block list with known blocks was found; supported families: "
        f"{', '.join(supported_families())}; a custom model can be added with diffboost.register_family(...)"
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
