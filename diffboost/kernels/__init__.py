"""Attention kernels: functional entry points in SDPA's layout and the plugins that install them.

    from diffboost.kernels import quantized_attention, sparse_attention
    out = sparse_attention(q, k, v, cdf_threshold=0.95)          # (batch, heads, tokens, head_dim)
    diffboost.apply(pipe, diffboost.SparseAttention())            # on a pipeline
"""

from .attention import KernelAttnProcessor, QuantizedAttention, SparseAttention
from .common import KernelInputError
from .quantized import quantize_blocks, quantized_attention
from .sparse import select_blocks, sparse_attention, sparsity, tile_order

__all__ = [
    "KernelAttnProcessor",
    "KernelInputError",
    "QuantizedAttention",
    "SparseAttention",
    "quantize_blocks",
    "quantized_attention",
    "select_blocks",
    "sparse_attention",
    "sparsity",
    "tile_order",
]
