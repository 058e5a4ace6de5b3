"""The attention-kernel plugins: ``QuantizedAttention`` and ``SparseAttention``.

The math lives in :mod:`diffboost.kernels.quantized` and :mod:`diffboost.kernels.sparse`; this
module is the model surgery, in two routes:

- **diffusers' attention dispatcher** (Flux, SD3's and Wan's newer processors, and every processor
  with an ``_attention_backend`` attribute): the kernel is registered as a dispatcher backend under a
  name of its own (``diffboost_<kernel>_<n>``, one per installed plugin, so that two pipelines with
  different settings never share one) and the chosen attention modules' processors are pointed at
  it. Our backend function gets the dispatcher's ``(batch, tokens, heads, head_dim)`` tensors.
- **attention processors** for the classic ``Attention`` module with ``AttnProcessor2_0`` (the SD
  and SDXL UNets, PixArt): the processor is replaced by :class:`KernelAttnProcessor`, which does what
  ``AttnProcessor2_0`` does around the attention product and calls the kernel for it.
- **processors that call** ``torch.nn.functional.scaled_dot_product_attention`` **themselves** (SD3,
  AuraFlow, CogVideoX, CogView3/4, Lumina 2, Mochi, Allegro, Sana's cross-attention): a hook on the
  attention module runs its forward under :class:`_SdpaRedirect`, a ``TorchFunctionMode`` that hands
  that one function to the kernel (every other torch call passes through untouched). The mode is
  thread-local and only active inside the module's forward.

Whenever the kernel cannot take an input (a mask, causal attention, another layout), or the step or
layer is configured to stay dense, the previous attention runs unchanged. ``remove()`` restores every
processor and backend exactly and unregisters the backend name.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Any, Callable, ClassVar

import torch
from diffusers.hooks.hooks import ModelHook

from ..plugins.adapters import Denoiser, PipelineAdapter, UnsupportedPipelineError
from ..plugins.base import Installed, Plugin, PluginKind, check_bools, check_choice, check_int, install_each
from ..plugins.runtime import CallTracker, HookSet
from . import quantized as quant_math
from . import sparse as sparse_math

logger = logging.getLogger("diffboost")

HOOK_NAME = "diffboost.attention_gate"
_names = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class _KernelPlugin(Plugin):
    """Fields every attention plugin has (see the subclasses' docstrings)."""

    kind: ClassVar[PluginKind] = PluginKind.ATTENTION
    dense_first_layers: int = 0
    dense_last_layers: int = 0
    dense_steps: int = 0
    cross_attention: bool = False
    backend: str = "diffboost"

    def _check_common(self) -> None:
        check_bools(self)
        check_int(self, "dense_first_layers", 0, 100_000)
        check_int(self, "dense_last_layers", 0, 100_000)
        check_int(self, "dense_steps", 0, 100_000)
        check_choice(self, "backend", backend_choices())

    def takes_key_padding(self) -> bool:
        """Whether the kernel applies key-padding masks itself (else masked calls run exactly)."""
        return False

    def kernel(self) -> Callable[..., Any]:
        """The attention product on ``(batch, heads, tokens, head_dim)`` tensors: this plugin's kernel,
        or the diffusers backend named by ``backend``."""
        if self.backend == "diffboost":
            return self._own_kernel()
        return functools.partial(_by_backend, _backend_member(self.backend))

    def _own_kernel(self) -> Callable[..., Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def install(self, adapter: PipelineAdapter, tracker: CallTracker) -> list[Installed]:
        return install_each(adapter, lambda d: InstalledKernel(self, d, tracker))


@dataclasses.dataclass(frozen=True)
class QuantizedAttention(_KernelPlugin):
    """SageAttention-style quantized attention (:func:`diffboost.kernels.quantized_attention`).

    Args:
        qk_format: ``"int8"`` (default) or ``"fp8_e4m3"``: the codes of Q and K (per-block scales).
        pv_format: ``"fp16"`` (default), ``"fp8_e4m3"`` (per-channel V scale) or ``"fp32"``.
        block_q, block_k: tokens per quantization block of Q (128) and K (64).
        smooth_k: subtract the mean key over tokens before quantizing (True).
        dense_first_layers, dense_last_layers: attention layers (in module order) left exact at the
            start and end of the denoiser (0, 0).
        dense_steps: the first denoising steps of each call left exact (0).
        cross_attention: also attention whose keys are not the queries' tokens (text
            cross-attention; False). Joint text-image attention (Flux, SD3) is self-attention here.
        backend: ``"diffboost"`` (default: this kernel) or the name of a diffusers attention backend
            that computes the routed calls instead, with the same layer, step and mask rules (e.g.
            ``"sage"`` or ``"_sage_qk_int8_pv_fp8_cuda"`` for SageAttention's own CUDA kernels,
            ``"xformers"``, ``"flash"``): checked installed at ``apply()``; the kernel's own fields
            are then unused. Backends that download kernels (``*_hub``) are not offered.

    On CPU this computes the quantized numerics in float32 (fake quantization): it shows the
    fidelity of the kernel, not its speed (no CPU path is faster than exact attention; see
    benchmarks/RESULTS.md, "Attention kernels").
    """

    qk_format: str = "int8"
    pv_format: str = "fp16"
    block_q: int = 128
    block_k: int = 64
    smooth_k: bool = True

    def __post_init__(self) -> None:
        self._check_common()
        quant_math.check_formats(self.qk_format, self.pv_format)
        check_int(self, "block_q", 1, 4096)
        check_int(self, "block_k", 1, 4096)

    def takes_key_padding(self) -> bool:
        """This kernel applies key-padding masks itself (a diffusers backend gets them as they are)."""
        return self.backend == "diffboost"

    def _own_kernel(self) -> Callable[..., Any]:
        return functools.partial(quant_math.quantized_attention, qk_format=self.qk_format, pv_format=self.pv_format,
                                 block_q=self.block_q, block_k=self.block_k, smooth_k=self.smooth_k)


@dataclasses.dataclass(frozen=True)
class SparseAttention(_KernelPlugin):
    """SpargeAttn-style block-sparse attention (:func:`diffboost.kernels.sparse_attention`).

    Args:
        cdf_threshold: tau, the pooled attention mass each query block keeps, (0, 1]; 1 keeps
            every block (exact attention). Default 0.95.
        topk: keep this fraction of the key blocks per query block instead, (0, 1], or None.
        sim_threshold: theta, blocks whose tokens' mean pairwise cosine is below it stay dense
            ([-1, 1]; default 0.5).
        block_q, block_k: tokens per query block (128) and key block (64).
        impl: ``"auto"`` (gather on CPU), ``"gather"``, ``"reference"`` or ``"flex"``.
        dense_first_layers, dense_last_layers, dense_steps, cross_attention, backend: as
            :class:`QuantizedAttention`.
    """

    cdf_threshold: float = 0.95
    topk: float | None = None
    sim_threshold: float = 0.5
    block_q: int = 128
    block_k: int = 64
    impl: str = "auto"

    def __post_init__(self) -> None:
        self._check_common()
        sparse_math.check_selection(self.cdf_threshold, self.topk, self.sim_threshold)
        check_int(self, "block_q", 1, 4096)
        check_int(self, "block_k", 1, 4096)
        check_choice(self, "impl", sparse_math.IMPLS)

    def never_skips(self) -> bool:
        return self.backend == "diffboost" and self.cdf_threshold >= 1 and self.topk is None

    def _own_kernel(self) -> Callable[..., Any]:
        return functools.partial(sparse_math.sparse_attention, cdf_threshold=self.cdf_threshold, topk=self.topk,
                                 sim_threshold=self.sim_threshold, block_q=self.block_q, block_k=self.block_k,
                                 impl=self.impl, return_keep=True)


def backend_choices() -> tuple[str, ...]:
    """``"diffboost"`` and diffusers' attention backends that run from installed packages."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return ("diffboost",) + tuple(m.value for m in AttentionBackendName
                                  if not m.value.endswith("_hub") and not m.value.startswith("diffboost_"))


def _backend_member(name: str) -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(name)


def _by_backend(member: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, backend=member)
    return out.transpose(1, 2)


def _check_backend_installed(cfg: "_KernelPlugin") -> None:
    if cfg.backend == "diffboost":
        return
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(_backend_member(cfg.backend))
    except RuntimeError as err:
        raise UnsupportedPipelineError(
            f"{type(cfg).__name__}(backend={cfg.backend!r}) cannot run here: {err} (xformers, SageAttention "
            "and flash-attn are CUDA extras; backend='diffboost' is this library's kernel)") from None


class _Counters:
    """Per-call numbers of one installed kernel (device sums; read in :meth:`InstalledKernel.stats`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.kernel_calls = 0
        self.exact_calls = 0
        self.kept_pairs: torch.Tensor | float = 0.0  # (query, key) token pairs the sparse kernel computed (device)
        self.pairs = 0


class _Gate(ModelHook):
    """On the denoiser: the kernel runs from step ``dense_steps`` of each call on."""

    def __init__(self, owner: "InstalledKernel"):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        owner = self.owner
        owner.active = owner.tracker.step >= owner.cfg.dense_steps
        return args, kwargs


def _run_kernel(owner: "InstalledKernel", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                attn_mask: torch.Tensor | None = None):
    """The kernel on (batch, heads, tokens, dim) tensors (with a key-padding mask where it takes one);
    counts what it did."""
    out = owner.kernel(q, k, v, scale=scale) if attn_mask is None else owner.kernel(q, k, v, attn_mask, scale=scale)
    c = owner.counters
    c.kernel_calls += 1
    if isinstance(out, tuple):  # the sparse kernel returns its kept blocks
        out, keep = out
        cfg = owner.cfg
        n, m = q.shape[2], k.shape[2]
        total = q.shape[0] * q.shape[1] * n * m
        c.kept_pairs = c.kept_pairs + (total if keep is None else
                                       sparse_math.kept_pairs(keep, n, m, cfg.block_q, cfg.block_k))
        c.pairs += total
    return out


def _wants(owner: "InstalledKernel", q_tokens: int, k_tokens: int, mask: Any, causal: bool, dropout: float) -> bool:
    """Whether the kernel answers this attention call (else the previous attention runs unchanged:
    a dense step, a mask, causal, dropout, cross-attention unless asked, a configuration that keeps
    everything)."""
    if not owner.active or owner.exact or causal or dropout:
        return False
    if mask is not None and not (owner.key_padding and _padding_shaped(mask)):
        return False
    return q_tokens == k_tokens or owner.cfg.cross_attention


def _padding_shaped(mask: Any) -> bool:
    """A mask that can be a key-padding mask by its shape (one row for all queries); the kernel
    checks its values and answers exactly when it is not one."""
    return isinstance(mask, torch.Tensor) and mask.dim() <= 4 and (mask.dim() < 2 or mask.shape[-2] == 1)


# --- the dispatcher route -----------------------------------------------------------------------


def _extend_backends(name: str, fn: Callable[..., Any]):
    """Add ``name`` to diffusers' closed ``AttentionBackendName`` enum and register ``fn`` for it."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = str.__new__(AttentionBackendName, name)
    member._name_ = name.upper()
    member._value_ = name
    AttentionBackendName._member_map_[member._name_] = member
    AttentionBackendName._value2member_map_[name] = member
    AttentionBackendName._member_names_.append(member._name_)
    _AttentionBackendRegistry._backends[member] = fn
    _AttentionBackendRegistry._constraints[member] = []
    _AttentionBackendRegistry._supported_arg_names[member] = {
        "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "_parallel_config"}
    return member


def _drop_backend(member: Any) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for table in (_AttentionBackendRegistry._backends, _AttentionBackendRegistry._constraints,
                  _AttentionBackendRegistry._supported_arg_names):
        table.pop(member, None)
    AttentionBackendName._member_map_.pop(member._name_, None)
    AttentionBackendName._value2member_map_.pop(member._value_, None)
    if member._name_ in AttentionBackendName._member_names_:
        AttentionBackendName._member_names_.remove(member._name_)


def _dispatcher_backend(owner: "InstalledKernel", previous: Any) -> Callable[..., Any]:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                _parallel_config=None):
        if _parallel_config is None and _wants(owner, query.shape[1], key.shape[1], attn_mask, is_causal, dropout_p):
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            if enable_gqa and k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return _run_kernel(owner, q, k, v, scale, attn_mask).transpose(1, 2)
        owner.counters.exact_calls += 1
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                     scale=scale, enable_gqa=enable_gqa, backend=previous,
                                     parallel_config=_parallel_config)

    return backend


# --- the processor route ------------------------------------------------------------------------


class KernelAttnProcessor:
    """``AttnProcessor2_0``'s steps around the attention product (for diffusers' classic
    ``Attention``), with the product by the kernel; the original processor answers what the kernel
    does not take."""

    def __init__(self, owner: "InstalledKernel", original: Any):
        self.owner = owner
        self.original = original

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        context_tokens = (hidden_states if encoder_hidden_states is None else encoder_hidden_states)
        q_tokens = hidden_states.shape[-1] * hidden_states.shape[-2] if hidden_states.ndim == 4 else hidden_states.shape[1]
        k_tokens = q_tokens if encoder_hidden_states is None else context_tokens.shape[1]
        # masks are left to the original processor here (they are not in SDPA's layout yet)
        if args or kwargs or attention_mask is not None or not _wants(self.owner, q_tokens, k_tokens, None, False, 0.0):
            self.owner.counters.exact_calls += 1
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = _run_kernel(self.owner, query, key, value, None)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _SdpaRedirect(torch.overrides.TorchFunctionMode):
    """Inside one attention module's forward: ``scaled_dot_product_attention`` by the kernel when it
    takes the call, every other function unchanged."""

    def __init__(self, owner: "InstalledKernel"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _redirected_sdpa(self.owner, func, *args, **kwargs)
        return func(*args, **kwargs)


def _redirected_sdpa(owner: "InstalledKernel", sdpa: Callable[..., Any], query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
                     scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    if query.ndim == 4 and _wants(owner, query.shape[2], key.shape[2], attn_mask, is_causal, dropout_p):
        if enable_gqa and key.shape[1] != query.shape[1]:
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return _run_kernel(owner, query, key, value, scale, attn_mask)
    owner.counters.exact_calls += 1
    return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa)


class _SdpaHook(ModelHook):
    """On an attention module whose processor calls SDPA itself: its forward under the redirect."""

    def __init__(self, owner: "InstalledKernel"):
        super().__init__()
        self.owner = owner

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        with _SdpaRedirect(self.owner):
            return self.fn_ref.original_forward(*args, **kwargs)


def _attention_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    # and attention modules of their own with a processor (MochiAttention)
    return [m for m in module.modules() if isinstance(m, (Attention, AttentionModuleMixin))
            or callable(getattr(m, "processor", None))]


def _processor_route(processor: Any) -> str | None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if hasattr(processor, "_attention_backend"):
        return "dispatcher"
    if type(processor) is AttnProcessor2_0:
        return "processor"
    call = getattr(type(processor), "__call__", None)
    if "scaled_dot_product_attention" in getattr(getattr(call, "__code__", None), "co_names", ()):
        return "sdpa"
    return None


class InstalledKernel(Installed):
    """One attention plugin on one denoiser: processors re-pointed or replaced, a step gate."""

    def __init__(self, cfg: _KernelPlugin, d: Denoiser, tracker: CallTracker):
        _check_backend_installed(cfg)
        self.cfg, self.denoiser, self.tracker = cfg, d, tracker
        self.kernel = cfg.kernel()
        self.exact = cfg.never_skips()  # keeps every block: the previous attention, bit for bit
        self.key_padding = cfg.takes_key_padding()
        self.counters = _Counters()
        self.active = cfg.dense_steps == 0
        modules = _attention_modules(d.module)
        routes = [(m, _processor_route(getattr(m, "processor", None))) for m in modules]
        usable = [(i, m, r) for i, (m, r) in enumerate(routes) if r is not None]
        if not usable:
            kinds = sorted({type(getattr(m, "processor", None)).__name__ for m in modules}) or ["no attention modules"]
            raise UnsupportedPipelineError(
                f"{type(cfg).__name__}: {type(d.module).__name__} has no attention processor diffboost can route "
                f"({', '.join(kinds)}); supported: processors using diffusers' attention dispatcher "
                "(an _attention_backend attribute), AttnProcessor2_0, and processors that call "
                "torch.nn.functional.scaled_dot_product_attention themselves")
        skipped = sorted({type(m.processor).__name__ for m, r in routes if r is None})
        if skipped:
            logger.info("%s: %s processors stay exact (no route for them)", type(cfg).__name__, ", ".join(skipped))
        n = len(modules)
        chosen = [(m, r) for i, m, r in usable if cfg.dense_first_layers <= i < n - cfg.dense_last_layers]
        self.layers = len(chosen)
        self._restore: list[Callable[[], None]] = []
        self._member = None
        try:
            dispatcher = [m for m, r in chosen if r == "dispatcher"]
            if dispatcher:
                previous = {getattr(m.processor, "_attention_backend", None) for m in dispatcher}
                if len(previous) != 1:
                    raise UnsupportedPipelineError(
                        f"{type(cfg).__name__}: the attention processors of {type(d.module).__name__} use different "
                        f"backends ({sorted(map(str, previous))}); set one with set_attention_backend first")
                prev = previous.pop()
                self._member = _extend_backends(f"diffboost_{type(cfg).__name__.lower()}_{next(_names)}",
                                                _dispatcher_backend(self, prev))
                for m in dispatcher:
                    proc = m.processor
                    had = "_attention_backend" in vars(proc)
                    old = vars(proc).get("_attention_backend")
                    proc._attention_backend = self._member
                    self._restore.append(functools.partial(_restore_backend, proc, had, old))
            for m, r in chosen:
                if r == "processor":
                    original = m.processor
                    m.processor = KernelAttnProcessor(self, original)
                    self._restore.append(functools.partial(setattr, m, "processor", original))
            self.hooks = HookSet(HOOK_NAME, d.module)
            self.hooks.add(d.module, _Gate(self))
            for m, r in chosen:
                if r == "sdpa":
                    self.hooks.add(m, _SdpaHook(self))
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        self.counters.reset()
        self.active = self.cfg.dense_steps == 0

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore = []
        if self._member is not None:
            _drop_backend(self._member)
            self._member = None
        hooks = getattr(self, "hooks", None)
        if hooks is not None:
            hooks.remove()
            self.hooks = None

    def stats(self) -> dict[str, Any]:
        c = self.counters
        out: dict[str, Any] = {"plugin": repr(self.cfg), "denoiser": self.denoiser.attr, "layers": self.layers,
                               "kernel_calls": c.kernel_calls, "exact_calls": c.exact_calls}
        if isinstance(self.cfg, SparseAttention):
            out["sparsity"] = 1.0 - float(c.kept_pairs) / c.pairs if c.pairs else 0.0
        return out


def _restore_backend(proc: Any, had: bool, old: Any) -> None:
    if had:
        proc._attention_backend = old
    else:
        vars(proc).pop("_attention_backend", None)
