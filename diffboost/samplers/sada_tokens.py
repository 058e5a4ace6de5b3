"""SADA token-wise sparsity for UNet transformer blocks (enabled by ``SADA(token_sparsity=True)``).

Why an option of :class:`~diffboost.samplers.sada.SADA` and not a separate ``PluginKind.TOKENS``
plugin: which tokens are pruned is decided by SADA's own stability signal ``m`` (computed on the
solver trajectory that the SADA step wrapper already keeps, per element instead of averaged) and by
SADA's step clock (``acc_range``, ``max_consecutive_skips``). A separate plugin would have to find another
plugin's runtime, duplicate the trajectory bookkeeping, or define an ordering between two
installs; as an option, one runtime owns the trajectory and both decisions. This module holds only
the token machinery; ``sada.py`` calls :func:`install_tokens` when the option is on.

Rule, per denoiser call at solver step ``k`` (identical for every block and both CFG branches):

- the stability map: the per-element ``m`` of the criterion (see ``sada.py``) after step ``k-1``,
  averaged over channels, maximised over the batch (one token set for the whole batch, so the
  doubled CFG batch shares it) -> an ``H x W`` map on the latent grid;
- the step is *pruned* when ``k`` lies in ``acc_range``, a map exists (three drifts solved) and fewer
  than ``max_consecutive_skips`` steps have passed since the last full step; otherwise it is a *full refresh*
  (all tokens computed, every block's cache rewritten): the first steps, every ``max_consecutive_skips``
  steps, and everything outside the acceleration range;
- on a pruned step each block (``BasicTransformerBlock`` at a level downsampled at most
  ``token_max_downsample`` times) maps the stability map onto its ``h x w`` grid by max-pooling
  (``d x d`` cells, ceil mode, as the UNet's stride-2 convolutions shrink ``h`` to ``ceil(h/2)``):
  a block token is unstable when any latent token it covers has ``m >= 0``;
- kept tokens: every unstable token, plus one token per ``sy x sx`` window of the grid (windows at
  the right/bottom edge may be partial and still keep one). The position inside the window moves with
  the step (``k mod sx*sy``, clamped into partial windows), so cached outputs of different tokens are
  refreshed in turn;
- the block runs on the kept tokens only (its self-attention sees only them); the output of each
  pruned token is taken from the block's cache, i.e. its output at the last step it was computed.

The cache is per block and per CFG branch (diffusers ``cache_context`` through
:class:`~diffboost.plugins.runtime.BranchStates`); a block whose input shape differs from its cache
runs in full. When every token is kept (all unstable) the block is called with its unchanged
arguments, so the output is bit-identical to the unpatched pipeline; with ``token_sparsity=False``
nothing of this module is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

from ..plugins.adapters import PipelineAdapter, UnsupportedPipelineError
from ..plugins.runtime import BranchStates, HookSet, compiled_around
from ..tokens.merging import _Grid, _GridHook, _transformer_blocks

if TYPE_CHECKING:
    from .sada import SADARuntime

GRID_HOOK = "diffboost.sada.grid"
BLOCK_HOOK = "diffboost.sada.tokens"
#: families whose UNet transformer blocks are BasicTransformerBlocks on a 2-D latent grid
TOKEN_FAMILIES = ("sd", "sdxl")


def kept_tokens(unstable: torch.Tensor, sx: int, sy: int, phase: int) -> torch.Tensor:
    """Flat indices (sorted) of the kept tokens of an ``h x w`` grid.

    ``unstable``: (h, w) bool. Kept: every unstable token and one token per ``sy x sx`` window, at
    offset ``phase mod (sx*sy)`` inside the window (clamped into partial edge windows).
    """
    h, w = unstable.shape
    oy, ox = divmod(phase % (sx * sy), sx)
    rows = torch.arange(h)
    cols = torch.arange(w)
    # the row / column each window keeps: window start + offset (offset < window size, so only a
    # partial window at the bottom / right edge can overflow: clamped to the grid's last index)
    keep_row = torch.clamp(rows // sy * sy + oy, max=h - 1)
    keep_col = torch.clamp(cols // sx * sx + ox, max=w - 1)
    grid_keep = (rows == keep_row).unsqueeze(1) & (cols == keep_col).unsqueeze(0)
    return (grid_keep | unstable.cpu()).flatten().nonzero().squeeze(1)


class _BlockCache(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.output: torch.Tensor | None = None


class TokenSparsity:
    """Token state of one SADA install: latent grid, per-step kept sets, statistics."""

    def __init__(self, runtime: "SADARuntime"):
        self.runtime = runtime
        self.cfg = runtime.cfg
        self.hooks: list[HookSet] = []
        self.blocks = 0
        self.reset()

    def reset(self) -> None:
        self._kept: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self.pruned_calls = 0
        self.tokens_in = 0
        self.tokens_out = 0

    # --- the decision, per block call ---------------------------------------------------------------

    def plan(self, grid: _Grid, n: int) -> torch.Tensor | None:
        """Kept indices for a block with ``n`` tokens on the current step, or None (compute all)."""
        st = self.runtime.state
        if not st.token_pruned or st.token_map is None:
            return None
        level = grid.level(n)
        if level is None or level[0] > self.cfg.token_max_downsample:
            return None
        d, h, w = level
        key = (st.step, d, h, w)
        if key not in self._kept:
            # a block token is unstable when any latent token of its d x d cell is (d = 1: the map itself)
            pooled = F.max_pool2d(st.token_map[None, None], d, ceil_mode=True)[0, 0]
            if tuple(pooled.shape) != (h, w):
                self._kept[key] = None  # type: ignore[assignment]
            else:
                self._kept[key] = kept_tokens(pooled >= 0, self.cfg.sx, self.cfg.sy, st.step)
        return self._kept[key]

    def stats(self) -> dict[str, Any]:
        return {
            "token_blocks": self.blocks,
            # block calls that ran on the kept tokens only
            "token_pruned_calls": self.pruned_calls,
            # mean share of tokens computed in those calls
            "token_kept_share": round(self.tokens_out / self.tokens_in, 4) if self.tokens_in else 1.0,
        }

    def remove(self) -> None:
        for hooks in reversed(self.hooks):
            hooks.remove()
        self.hooks.clear()


@compiled_around("new_forward")
class PrunedBlock(ModelHook):
    """Hook on a ``BasicTransformerBlock``: runs it on the kept tokens, fills the rest from its cache."""

    _is_stateful = True  # receives the cond/uncond cache context

    def __init__(self, tokens: TokenSparsity, grid: _Grid):
        super().__init__()
        self.tokens, self.grid = tokens, grid
        self.cache = BranchStates(_BlockCache)

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        st: _BlockCache = self.cache.get_state()
        mask = kwargs.get("attention_mask", args[0] if args else None)
        idx = None
        if isinstance(hidden_states, torch.Tensor) and hidden_states.ndim == 3 and mask is None:
            idx = self.tokens.plan(self.grid, hidden_states.shape[1])
        cached = st.output
        usable = cached is not None and isinstance(idx, torch.Tensor) and cached.shape[:2] == hidden_states.shape[:2]
        if not usable or idx.numel() == hidden_states.shape[1]:
            out = forward(hidden_states, *args, **kwargs)
            if isinstance(out, torch.Tensor) and out.ndim == 3:
                st.output = out
            return out
        idx = idx.to(hidden_states.device)
        part = forward(hidden_states[:, idx], *args, **kwargs)
        out = cached.clone()
        out[:, idx] = part.to(out.dtype)
        st.output = out
        tokens = self.tokens
        tokens.pruned_calls += 1
        tokens.tokens_in += hidden_states.shape[1]
        tokens.tokens_out += idx.numel()
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache.reset()
        return module


def install_tokens(runtime: "SADARuntime", adapter: PipelineAdapter) -> TokenSparsity:
    """Put the grid hook on each UNet and a :class:`PrunedBlock` on each of its transformer blocks."""
    if adapter.kind != "unet" or adapter.family not in TOKEN_FAMILIES:
        raise UnsupportedPipelineError(
            f"SADA(token_sparsity=True) supports the UNet families {', '.join(TOKEN_FAMILIES)}, not "
            f"{adapter.family}: token-wise sparsity needs BasicTransformerBlocks on a 2-D latent grid "
            "(use token_sparsity=False for step-wise SADA)"
        )
    tokens = TokenSparsity(runtime)
    try:
        for d in adapter:
            grid = _Grid()
            grid_hooks = HookSet(GRID_HOOK, d.module)
            tokens.hooks.append(grid_hooks)
            grid_hooks.add(d.module, _GridHook(grid, "sample", 1))
            block_hooks = HookSet(BLOCK_HOOK, d.module)
            tokens.hooks.append(block_hooks)
            for block in _transformer_blocks(d, adapter.family):
                block_hooks.add(block, PrunedBlock(tokens, grid))
                tokens.blocks += 1
        if tokens.blocks == 0:
            raise UnsupportedPipelineError("SADA(token_sparsity=True) found no BasicTransformerBlock in the UNet")
    except BaseException:
        tokens.remove()
        raise
    return tokens
