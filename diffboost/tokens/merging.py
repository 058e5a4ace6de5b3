"""Token reduction in diffusion self-attention: ToMe for SD and ToDo.

Two training-free plugins that shrink the sequence self-attention works on in the denoiser's
transformer blocks (``BasicTransformerBlock``: UNets of SD 1.x/2.x and SDXL, and PixArt).

**TokenMerging** (ToMe for SD, Bolya & Hoffman 2023). In a block whose image tokens form an
``h x w`` grid (N = h * w tokens):

1. the grid is cut into ``sy x sx`` windows; one token per window, at a random (seeded) position,
   becomes a *destination* (set B); every other token is a *source* (set A);
2. each source is matched to its most similar destination: cosine similarity of the block's
   normalised input (what ``attn1`` receives), ``s(a, b) = <a, b> / (|a| |b|)``;
3. the ``r = ratio * N`` sources with the highest similarity are merged into their destinations by
   mean; the other sources stay as they are, so the sequence has ``M = N - r`` tokens;
4. attention (and optionally cross-attention and the MLP) run on the ``M`` tokens;
5. *unmerge*: each of the ``N`` positions takes the output of the slot it was merged into (a merged
   source copies its destination's output).

It acts only where the image is downsampled at most ``max_downsample`` times relative to the
latent (1 = the highest-resolution blocks, as tomesd's default), because merging is cheap where N
is large and costly in fidelity where it is small.

**TokenDownsampling** (ToDo, Smith et al. 2024): in the same self-attention layers, keys and
values are computed from a ``factor``-times downsampled token grid (strided pick of one token per
``factor x factor`` cell, or its mean) while all queries stay: attention costs N * N / factor^2
instead of N * N and the output keeps its N tokens, so nothing needs unmerging.

Mechanics (nothing is patched on classes):

- the denoiser gets a pre-forward hook (:class:`_GridHook`) that records the latent grid from the
  input the pipeline passes (``sample.shape[-2:]`` for UNets, ``hidden_states.shape[-2:] / patch``
  for PixArt); a block's grid follows from its token count: the UNet halves it per level
  (``ceil(h / 2)``, as its stride-2 convolutions do);
- each block's ``attn1`` gets an attention-processor wrapper around the processor it had (which may
  be another plugin's); ``attn2`` and ``ff`` get a wrapper / a diffusers hook only when
  ``merge_crossattn`` / ``merge_mlp`` ask for it;
- ``remove()`` puts back the very processor objects that were there and takes the hooks off.

``ratio=0`` and ``factor=1`` call the wrapped processor with the unchanged arguments: the output is
bit-identical to the unpatched pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..plugins.adapters import Denoiser, PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import Installed, Plugin, PluginKind, check_bools, check_choice, check_float, check_int
from ..plugins.runtime import CallTracker, HookSet, logger, compiled_around

HOOK_NAME = "diffboost.tokens"
#: families whose transformer blocks are ``BasicTransformerBlock`` with a plain self-attention
SUPPORTED = ("sd", "sdxl", "pixart")
#: powers of two the UNet levels are downsampled by (SD: 1, 2, 4, 8)
DOWNSAMPLE_CHOICES = (1, 2, 4, 8)


# ----------------------------------------------------------------------------------------------
# plugin configs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenMerging(Plugin):
    """ToMe for SD: merge similar tokens before self-attention, copy the outputs back after it.

    Args:
        ratio: r / N, share of a block's tokens merged away, in [0, 1]. Default 0.5. At most the
            sources can merge (1 - 1 / (sx * sy) of the tokens: 0.75 with 2x2 windows); a higher
            ratio is capped there. 0 = nothing merged, bit-identical to the unpatched pipeline.
        sx, sy: window width / height in tokens; one destination per window (sx * sy >= 2).
            Default 2 x 2.
        max_downsample: act on blocks whose token grid is downsampled at most this much relative to
            the latent, one of 1, 2, 4, 8 (1 = highest-resolution blocks only). Default 1.
        seed: seed of the random destination positions; the generator restarts at every pipeline
            call, so a call is deterministic. Default 0.
        random_dst: random destination inside each window (True, as the paper) or always its
            top-left token. Default True.
        merge_attn: merge for self-attention (``attn1``). Default True.
        merge_crossattn: merge the queries of cross-attention (``attn2``) too. Default False.
        merge_mlp: merge for the feed-forward (``ff``) too. Default False.
    """

    kind: ClassVar[PluginKind] = PluginKind.TOKENS

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    max_downsample: int = 1
    seed: int = 0
    random_dst: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self) -> None:
        check_bools(self)
        check_float(self, "ratio", 0.0, 1.0)
        check_int(self, "sx", 1, 64)
        check_int(self, "sy", 1, 64)
        if self.sx * self.sy < 2:
            raise ValueError(
                f"TokenMerging.sx * TokenMerging.sy = {self.sx * self.sy}: a window must hold at least one "
                "source besides its destination; allowed: sx * sy >= 2"
            )
        check_choice(self, "max_downsample", DOWNSAMPLE_CHOICES)
        check_int(self, "seed", 0, 2**63 - 1)
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("TokenMerging: merge_attn, merge_crossattn and merge_mlp are all False; set one")

    def never_skips(self) -> bool:
        return self.ratio == 0

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        return [_install(self, d, adapter) for d in _supported(self, adapter)]


@dataclasses.dataclass(frozen=True)
class TokenDownsampling(Plugin):
    """ToDo: self-attention with keys/values from a downsampled token grid, all queries kept.

    Args:
        factor: downsampling factor per axis, 1-8; keys/values shrink by factor^2. Default 2.
            1 = bit-identical to the unpatched pipeline.
        max_downsample: act on blocks whose token grid is downsampled at most this much relative to
            the latent, one of 1, 2, 4, 8 (1 = highest-resolution blocks only). Default 1.
        mode: ``"nearest"`` (one token per ``factor x factor`` cell, its top-left: the strided
            subsampling of the paper) or ``"avg"`` (the cell's mean). Default "nearest".
    """

    kind: ClassVar[PluginKind] = PluginKind.TOKENS

    factor: int = 2
    max_downsample: int = 1
    mode: str = "nearest"

    def __post_init__(self) -> None:
        check_bools(self)
        check_int(self, "factor", 1, 8)
        check_choice(self, "max_downsample", DOWNSAMPLE_CHOICES)
        check_choice(self, "mode", ("nearest", "avg"))

    def never_skips(self) -> bool:
        return self.factor == 1

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        return [_install(self, d, adapter) for d in _supported(self, adapter)]


def _supported(cfg: Plugin, adapter: PipelineAdapter) -> list[Denoiser]:
    if adapter.family not in SUPPORTED:
        raise UnsupportedPipelineError(
            f"{cfg.name} supports the families {', '.join(SUPPORTED)} (self-attention of BasicTransformerBlocks "
            f"on a 2-D token grid), not {adapter.family}: its blocks use rotary position embeddings and/or "
            "joint text-image attention, where merged tokens have no single position"
        )
    return list(adapter)


# ----------------------------------------------------------------------------------------------
# the token grid
# ----------------------------------------------------------------------------------------------


class _Grid:
    """Latent token grid (H, W) of the current denoiser call, and each block's grid derived from it."""

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None
        self._levels: dict[tuple[int, int, int], tuple[int, int, int] | None] = {}

    def level(self, n: int) -> tuple[int, int, int] | None:
        """(downsample d, h, w) of a block with ``n`` tokens, or None when n is no level of the grid."""
        if self.size is None:
            return None
        key = (*self.size, n)
        if key not in self._levels:
            (h, w), d = self.size, 1
            while h * w > n and d < 64:
                # a stride-2 convolution (padding 1) or pooling maps h to ceil(h / 2)
                h, w, d = -(-h // 2), -(-w // 2), d * 2
            self._levels[key] = (d, h, w) if h * w == n else None
        return self._levels[key]


@compiled_around("pre_forward")
class _GridHook(ModelHook):
    """Pre-forward hook on the denoiser: records the latent grid of every call (no other effect)."""

    def __init__(self, grid: _Grid, arg: str, patch: int):
        super().__init__()
        self.grid, self.arg, self.patch = grid, arg, patch

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        x = kwargs[self.arg] if self.arg in kwargs else (args[0] if args else None)
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self.grid.size = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        else:
            self.grid.size = None
        return args, kwargs


# ----------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching on a 2-D grid
# ----------------------------------------------------------------------------------------------


class _Merge:
    """One matching of N tokens to M = N - r slots.

    ``slot[b, i]`` is the slot token i lands in: destinations and kept sources own one slot each,
    a merged source shares its destination's slot. Merging averages each slot's tokens, unmerging
    gives every token its slot's value.
    """

    def __init__(self, slot: torch.Tensor, slots: int):
        self.slot = slot  # (B, N) int64
        self.slots = slots  # M
        self.shape = tuple(slot.shape)

    def fits(self, x: torch.Tensor) -> bool:
        return x.ndim == 3 and tuple(x.shape[:2]) == self.shape

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, C) -> (B, M, C): x'_m = mean of x_i over the tokens i with slot[i] = m
        index = self.slot.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        out = x.new_zeros(x.shape[0], self.slots, x.shape[-1])
        return out.scatter_reduce_(1, index, x, reduce="mean", include_self=False)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        # (B, M, C) -> (B, N, C): y_i = y'_slot[i] (a merged source copies its destination)
        return y.gather(1, self.slot.unsqueeze(-1).expand(-1, -1, y.shape[-1]))


def _destinations(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None) -> torch.Tensor:
    """Flat indices of one destination per full sy x sx window (row-major windows)."""
    hs, ws = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(hs, ws, dtype=torch.long)
    else:
        offset = torch.randint(sy * sx, (hs, ws), generator=generator)
    rows = torch.arange(hs).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(ws).unsqueeze(0) * sx + offset % sx
    return (rows * w + cols).flatten()


def bipartite_merge(
    x: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, generator: torch.Generator | None = None
) -> _Merge | None:
    """Match the tokens of ``x`` (B, N = h * w, C) and merge the ``r`` most similar sources.

    ``generator`` draws the destination inside each window (None: top-left). Tokens of partial
    windows at the right/bottom edge are sources. Returns None when nothing can be merged.
    """
    n = h * w
    is_dst = torch.zeros(n, dtype=torch.bool)
    dst = _destinations(h, w, sx, sy, generator)
    is_dst[dst] = True
    src = (~is_dst).nonzero().squeeze(1)
    r = min(r, src.numel())
    if r <= 0 or dst.numel() == 0:
        return None
    dst, src = dst.to(x.device), src.to(x.device)
    n_dst, n_src, batch = dst.numel(), src.numel(), x.shape[0]

    # cosine similarity of every source to every destination: (B, |A|, |B|)
    k = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)
    similarity = k[:, src] @ k[:, dst].transpose(1, 2)
    best, nearest = similarity.max(dim=-1)  # each source's most similar destination
    order = best.argsort(dim=-1, descending=True, stable=True)  # sources, most similar first
    merged, kept = order[:, :r], order[:, r:]

    # slots: destinations 0..|B|-1, kept sources |B|..M-1, merged sources their destination's slot
    src_slot = torch.empty(batch, n_src, dtype=torch.long, device=x.device)
    kept_slots = torch.arange(n_dst, n_dst + n_src - r, device=x.device).expand(batch, -1)
    src_slot.scatter_(1, kept, kept_slots)
    src_slot.scatter_(1, merged, nearest.gather(1, merged))
    slot = torch.empty(batch, n, dtype=torch.long, device=x.device)
    slot[:, dst] = torch.arange(n_dst, device=x.device)
    slot[:, src] = src_slot
    return _Merge(slot, n - r)


# ----------------------------------------------------------------------------------------------
# attention-processor wrappers
# ----------------------------------------------------------------------------------------------


class _ProcessorWrapper:
    """Wraps the processor an ``Attention`` module had; forwards everything it does not change.

    ``Attention.forward`` drops keyword arguments that are not in ``processor.__call__``'s
    signature, so the instance's ``__call__`` attribute reports the wrapped processor's signature
    (through ``__wrapped__``) and the wrapper passes on exactly what the original would receive.
    """

    def __init__(self, inner: Any):
        self.inner = inner

        def call(attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.process(attn, hidden_states, *args, **kwargs)

        call.__wrapped__ = inner.__call__  # type: ignore[attr-defined]
        self.__dict__["__call__"] = call

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.process(attn, hidden_states, *args, **kwargs)

    def process(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        # attributes some code reads off processors (e.g. ``is_flash_attn``) come from the wrapped one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


def _plain_self_attention(hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """A 3-D sequence without encoder states or mask: the self-attention these methods change."""
    return (
        not args
        and hidden_states.ndim == 3
        and kwargs.get("encoder_hidden_states") is None
        and kwargs.get("attention_mask") is None
    )


class _BlockSite:
    """Per-block state of TokenMerging: the matching computed at ``attn1`` for the block's call."""

    def __init__(self, owner: "TokenInstall"):
        self.owner = owner
        self.current: _Merge | None = None

    def take(self, last: bool) -> _Merge | None:
        m = self.current
        if last:
            self.current = None
        return m


class _MergeSelfAttention(_ProcessorWrapper):
    """``attn1``: computes the block's matching; merges, attends and unmerges when ``merge_attn``."""

    def __init__(self, inner: Any, site: _BlockSite, consumers: bool):
        super().__init__(inner)
        self.site, self.consumers = site, consumers

    def process(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        site, owner = self.site, self.site.owner
        m = owner.match(hidden_states) if _plain_self_attention(hidden_states, args, kwargs) else None
        site.current = m if self.consumers else None
        if m is not None:
            owner.count(hidden_states.shape[1], m.slots)
        if m is None or not owner.cfg.merge_attn:
            return self.inner(attn, hidden_states, *args, **kwargs)
        return m.unmerge(self.inner(attn, m.merge(hidden_states), *args, **kwargs))


class _MergeCrossAttention(_ProcessorWrapper):
    """``attn2``: queries of the merged tokens attend to the text; outputs copied back."""

    def __init__(self, inner: Any, site: _BlockSite, last: bool):
        super().__init__(inner)
        self.site, self.last = site, last

    def process(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m = self.site.take(self.last)
        if m is None or not m.fits(hidden_states):
            return self.inner(attn, hidden_states, *args, **kwargs)
        return m.unmerge(self.inner(attn, m.merge(hidden_states), *args, **kwargs))


@compiled_around("new_forward")
class _MergeMlp(ModelHook):
    """Hook on the block's ``ff``: the feed-forward runs on the merged tokens."""

    def __init__(self, site: _BlockSite):
        super().__init__()
        self.site = site

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        m = self.site.take(last=True)
        if m is None or not m.fits(hidden_states):  # e.g. chunked feed-forward: leave it alone
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        return m.unmerge(self.fn_ref.original_forward(m.merge(hidden_states), *args, **kwargs))


class _DownsampleKeysValues(_ProcessorWrapper):
    """``attn1`` under ToDo: keys/values from the downsampled grid passed as ``encoder_hidden_states``."""

    def __init__(self, inner: Any, owner: "TokenInstall"):
        super().__init__(inner)
        self.owner = owner

    def process(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        owner = self.owner
        plain = owner.cfg.factor > 1 and _plain_self_attention(hidden_states, args, kwargs)
        grid = owner.grid_of(hidden_states) if plain else None
        if grid is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        h, w = grid
        f = owner.cfg.factor
        x = hidden_states.unflatten(1, (h, w))  # (B, h, w, C)
        if owner.cfg.mode == "nearest":
            kv = x[:, ::f, ::f]  # one token per f x f cell: (B, ceil(h/f), ceil(w/f), C)
        else:
            kv = F.avg_pool2d(x.permute(0, 3, 1, 2), f, f, ceil_mode=True).permute(0, 2, 3, 1)
        kv = kv.flatten(1, 2)
        owner.count(hidden_states.shape[1], kv.shape[1])
        # attn1 applies no norm_cross: keys/values are to_k/to_v of the downsampled normalised input
        return self.inner(attn, hidden_states, *args, **{**kwargs, "encoder_hidden_states": kv})


# ----------------------------------------------------------------------------------------------
# installation
# ----------------------------------------------------------------------------------------------


class TokenInstall(Installed):
    """Everything one token plugin put on one denoiser."""

    def __init__(self, cfg: Plugin, denoiser: Denoiser, grid: _Grid, hooks: HookSet):
        self.cfg, self.denoiser, self.grid, self.hooks = cfg, denoiser, grid, hooks
        #: (Attention module, processor it had, our wrapper)
        self.swaps: list[tuple[torch.nn.Module, Any, _ProcessorWrapper]] = []
        self.generator = torch.Generator().manual_seed(getattr(cfg, "seed", 0))
        self.blocks = 0
        self.reset()

    # -- per call ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.generator.manual_seed(getattr(self.cfg, "seed", 0))
        self.calls = 0
        self.tokens_in = 0
        self.tokens_out = 0

    def count(self, n_in: int, n_out: int) -> None:
        self.calls += 1
        self.tokens_in += n_in
        self.tokens_out += n_out

    def grid_of(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The (h, w) grid of a block's tokens when the block is at an allowed level, else None."""
        level = self.grid.level(x.shape[1])
        if level is None or level[0] > self.cfg.max_downsample:
            return None
        return level[1], level[2]

    def match(self, x: torch.Tensor) -> _Merge | None:
        cfg: TokenMerging = self.cfg  # type: ignore[assignment]
        if cfg.ratio == 0:
            return None
        grid = self.grid_of(x)
        if grid is None:
            return None
        r = int(x.shape[1] * cfg.ratio)
        return bipartite_merge(x, *grid, cfg.sx, cfg.sy, r, self.generator if cfg.random_dst else None)

    # -- install / remove -------------------------------------------------------------------------

    def swap(self, attn: torch.nn.Module, make: Callable[[Any], _ProcessorWrapper]) -> None:
        original = attn.processor
        wrapper = make(original)
        attn.set_processor(wrapper)
        self.swaps.append((attn, original, wrapper))

    def remove(self) -> None:
        for attn, original, wrapper in reversed(self.swaps):
            if attn.processor is wrapper:
                attn.set_processor(original)
            else:
                logger.warning(
                    "%s: the attention processor of %s was replaced after apply(); leaving the new one",
                    self.cfg.name, type(attn).__name__,
                )
        self.swaps.clear()
        self.hooks.remove()

    def stats(self) -> dict[str, Any]:
        return {
            "denoiser": self.denoiser.attr,
            "plugin": repr(self.cfg),
            "blocks": self.blocks,
            # block calls that ran on reduced tokens (ToMe: a matching was made; ToDo: keys/values downsampled)
            "reduced_calls": self.calls,
            # mean share of tokens kept (ToMe) / of keys-values kept (ToDo) in those calls
            "kept_share": round(self.tokens_out / self.tokens_in, 4) if self.tokens_in else 1.0,
        }


def _transformer_blocks(d: Denoiser, family: str) -> list[torch.nn.Module]:
    """The ``BasicTransformerBlock``s: inside the UNet levels' ``attentions``, or PixArt's blocks."""
    found: list[torch.nn.Module] = []
    for block in d.blocks:
        candidates = [block] if family == "pixart" else list(block.modules())
        found.extend(m for m in candidates if type(m).__name__ == "BasicTransformerBlock")
    return found


def _install(cfg: Plugin, d: Denoiser, adapter: PipelineAdapter) -> TokenInstall:
    grid = _Grid()
    hooks = HookSet(HOOK_NAME, d.module)
    inst = TokenInstall(cfg, d, grid, hooks)
    try:
        if adapter.kind == "unet":
            hooks.add(d.module, _GridHook(grid, "sample", 1))
        else:
            hooks.add(d.module, _GridHook(grid, "hidden_states", int(d.module.config.patch_size)))
        for block in _transformer_blocks(d, adapter.family):
            if getattr(block, "attn1", None) is None:
                continue
            inst.blocks += 1
            if isinstance(cfg, TokenDownsampling):
                inst.swap(block.attn1, lambda p: _DownsampleKeysValues(p, inst))
                continue
            assert isinstance(cfg, TokenMerging)
            site = _BlockSite(inst)
            cross = cfg.merge_crossattn and getattr(block, "attn2", None) is not None
            mlp = cfg.merge_mlp and getattr(block, "ff", None) is not None
            inst.swap(block.attn1, lambda p: _MergeSelfAttention(p, site, consumers=cross or mlp))
            if cross:
                inst.swap(block.attn2, lambda p: _MergeCrossAttention(p, site, last=not mlp))
            if mlp:
                hooks.add(block.ff, _MergeMlp(site))
        if inst.blocks == 0:
            raise UnsupportedPipelineError(
                f"{cfg.name} found no BasicTransformerBlock with self-attention in {type(d.module).__name__}"
            )
    except BaseException:
        inst.remove()
        raise
    return inst
