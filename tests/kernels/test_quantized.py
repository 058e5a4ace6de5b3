"""quantized_attention: the per-block quantizer on exact numbers, the whole kernel against an
independent loop-per-block implementation of SageAttention's numerics, the INT8 path bit for bit,
the smoothing, the formats' accuracy, the fallbacks and the refusals."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from diffboost.kernels import KernelInputError, quantize_blocks, quantized_attention
from diffboost.kernels import common


def qkv(n=200, m=None, d=32, heads=2, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (torch.randn(batch, heads, n, d, generator=g), torch.randn(batch, heads, m, d, generator=g),
            torch.randn(batch, heads, m, d, generator=g))


def cosine(a, b):
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_quantize_blocks_int8_on_exact_numbers():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25], [10.0, 0.0], [0.0, 0.0], [3.0, -3.0]])[None, None]  # 5 tokens
    codes, delta = quantize_blocks(x, 2, "int8")
    assert delta.shape == (1, 1, 5, 1)
    assert delta.flatten().tolist() == pytest.approx([2 / 127, 2 / 127, 10 / 127, 10 / 127, 3 / 127])
    assert codes[0, 0, 0].tolist() == [64.0, -127.0]  # 1 / (2/127) = 63.5 -> 64 (round half to even: 64)
    assert codes[0, 0, 1].tolist() == [32.0, 16.0]  # 31.75 -> 32, 15.875 -> 16
    assert codes[0, 0, 2].tolist() == [127.0, 0.0] and codes[0, 0, 3].tolist() == [0.0, 0.0]
    assert codes[0, 0, 4].tolist() == [127.0, -127.0]  # the partial last block has its own scale


def test_small_blocks_get_their_own_scale():
    x = torch.tensor([[0.5, -0.25], [0.125, 0.0]])[None, None]  # max |x| below 1
    codes, delta = quantize_blocks(x, 2, "int8")
    assert delta.flatten().tolist() == pytest.approx([0.5 / 127] * 2)
    assert codes[0, 0, 0].tolist() == [127.0, -64.0]  # -63.5 -> -64 (half to even)


def test_quantize_blocks_zero_block_and_fp8_codes():
    x = torch.zeros(1, 1, 4, 3)
    x[0, 0, 2:] = torch.tensor([[0.1, -900.0, 3.0], [1.0, 2.0, 0.0]])
    codes, delta = quantize_blocks(x, 2, "fp8_e4m3")
    assert delta[0, 0, :2].flatten().tolist() == [1.0, 1.0] and codes[0, 0, :2].abs().sum() == 0
    assert delta[0, 0, 2, 0] == pytest.approx(900 / 448)
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # every code is an e4m3 value
    assert codes[0, 0, 2, 1] == -448.0
    assert (codes * delta - x).abs().max() < 0.07 * 900 / 448 * 8  # e4m3 relative error ~ 1/16


def loop_reference(q, k, v, qk_format, pv_format, block_q, block_k, smooth_k, scale=None):
    """SageAttention's numerics for one (batch, head), block by block with Python loops, in float32
    in the kernel's order of operations (so that rounding at the format boundaries agrees)."""
    qmax = torch.tensor(127.0 if qk_format == "int8" else 448.0)

    def quantize(x):
        amax = x.abs().max()
        delta = amax / qmax if amax > 0 else torch.tensor(1.0)
        y = x / delta
        codes = torch.clamp(torch.round(y), -127, 127) if qk_format == "int8" else \
            y.clamp(-448, 448).to(torch.float8_e4m3fn).float()
        return codes, delta

    if smooth_k:
        k = k - k.mean(0, keepdim=True)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = torch.zeros(n, m)
    for i in range(0, n, block_q):
        cq, dq = quantize(q[i:i + block_q])
        for j in range(0, m, block_k):
            ck, dk = quantize(k[j:j + block_k])
            s[i:i + block_q, j:j + block_k] = (cq @ ck.T) * dq * (dk * scale)
    p = torch.exp(s - s.max(1, keepdim=True).values)
    l = p.sum(1, keepdim=True)
    if pv_format == "fp32":
        o = p @ v
    elif pv_format == "fp16":
        o = p.half().float() @ v.half().float()
    else:
        dv = v.abs().max(0, keepdim=True).values / 448
        pq = (p * 448).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        vq = (v / dv).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        o = (pq @ vq) * (dv / 448)
    return o / l


@pytest.mark.parametrize("qk_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("pv_format", ["fp32", "fp16", "fp8_e4m3"])
def test_the_kernel_is_sageattentions_numerics(qk_format, pv_format):
    q, k, v = qkv(n=70, m=50, d=16, heads=2)
    k = k + 3.0  # a shared key offset, which smoothing removes
    out = quantized_attention(q, k, v, qk_format=qk_format, pv_format=pv_format, block_q=32, block_k=16, scale=0.3)
    for h in range(2):
        ref = loop_reference(q[0, h], k[0, h], v[0, h], qk_format, pv_format, 32, 16, True, scale=0.3)
        assert torch.allclose(out[0, h], ref, atol=1e-6, rtol=1e-5), (qk_format, pv_format, h)


def test_default_blocks_are_sageattentions_128_by_64():
    q, k, v = qkv(n=300, m=200, d=16, heads=1)
    out = quantized_attention(q, k, v, pv_format="fp32")
    ref = loop_reference(q[0, 0], k[0, 0], v[0, 0], "int8", "fp32", 128, 64, True)
    assert torch.allclose(out[0, 0], ref, atol=1e-6, rtol=1e-5)
    other = loop_reference(q[0, 0], k[0, 0], v[0, 0], "int8", "fp32", 129, 65, True)
    assert not torch.allclose(out[0, 0], other, atol=1e-6, rtol=1e-5)


def test_a_zero_value_channel_stays_finite():
    q, k, v = qkv(n=64, d=8)
    v[..., 3] = 0
    out = quantized_attention(q, k, v, pv_format="fp8_e4m3")
    assert torch.isfinite(out).all() and (out[..., 3] == 0).all()


def test_int8_products_match_the_float_path_bit_for_bit():
    q, k, v = qkv(n=130, m=90, d=64, batch=2)
    a = quantized_attention(q, k, v, impl="reference")
    b = quantized_attention(q, k, v, impl="int8")
    assert torch.equal(a, b)


def test_smoothing_k_removes_the_shared_offset_from_the_error():
    q, k, v = qkv(n=256, d=64)
    k = k + 20 * torch.randn(1, 1, 1, 64)  # a channel-wise outlier shared by every token
    ref = F.scaled_dot_product_attention(q, k, v)
    smooth = quantized_attention(q, k, v, pv_format="fp32", smooth_k=True)
    raw = quantized_attention(q, k, v, pv_format="fp32", smooth_k=False)
    err_smooth, err_raw = (smooth - ref).abs().mean(), (raw - ref).abs().mean()
    assert err_smooth * 5 < err_raw
    assert cosine(smooth, ref) > 0.999


@pytest.mark.parametrize("qk_format, pv_format, floor", [
    ("int8", "fp16", 0.9995), ("int8", "fp32", 0.9995), ("int8", "fp8_e4m3", 0.999), ("fp8_e4m3", "fp16", 0.998)])
def test_accuracy_against_exact_attention(qk_format, pv_format, floor):
    q, k, v = qkv(n=512, d=64, heads=2, seed=3)
    out = quantized_attention(q, k, v, qk_format=qk_format, pv_format=pv_format)
    assert cosine(out, F.scaled_dot_product_attention(q, k, v)) >= floor


def test_per_channel_v_scale_keeps_small_channels():
    q, k, v = qkv(n=128, d=16)
    v[..., 0] *= 1000  # one huge channel; a per-tensor scale would flush the others to zero
    out = quantized_attention(q, k, v, pv_format="fp8_e4m3")
    ref = F.scaled_dot_product_attention(q, k, v)
    assert cosine(out[..., 1:], ref[..., 1:]) > 0.995


def test_dtypes_in_and_out():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(n=64))
    out = quantized_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


def test_masks_causal_and_dropout_fall_back_to_exact_attention_once(caplog):
    common._warned.clear()
    q, k, v = qkv(n=40)
    mask = torch.rand(40, 40) > 0.3
    with caplog.at_level(logging.WARNING, logger="diffboost"):
        out = quantized_attention(q, k, v, attn_mask=mask)
        quantized_attention(q, k, v, attn_mask=mask)
        causal = quantized_attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert caplog.text.count("quantized_attention does not take an attention mask") == 1
    assert caplog.text.count("quantized_attention does not take causal attention") == 1


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.zeros(2, 3, 4),) * 3, {}, "must be a 4-D tensor"),
    ((torch.zeros(1, 1, 4, 8, dtype=torch.float64),) * 3, {}, "allowed: float32, bfloat16, float16"),
    ((torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)), {}, "batch and heads must match"),
    ((torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 8)), {}, "head_dim differ"),
    ((torch.zeros(1, 1, 0, 8),) * 3, {}, "no tokens"),
    ((torch.zeros(1, 1, 4, 8),) * 3, {"qk_format": "int4"}, "qk_format must be one of"),
    ((torch.zeros(1, 1, 4, 8),) * 3, {"pv_format": "bf16"}, "pv_format must be one of"),
    ((torch.zeros(1, 1, 4, 8),) * 3, {"impl": "int8", "qk_format": "fp8_e4m3"}, "needs qk_format='int8'"),
    ((torch.zeros(1, 1, 4, 8),) * 3, {"block_q": 0}, "block_q must be an integer in [1, 4096]"),
    ((torch.zeros(1, 1, 4, 8),) * 3, {"scale": -1.0}, "scale must be a positive finite number"),
])
def test_refusals(args, kwargs, message):
    with pytest.raises(ValueError) as err:
        quantized_attention(*args, **kwargs)
    assert message in str(err.value)
    if "4-D" in message:
        assert isinstance(err.value, KernelInputError)


def test_key_padding_masks_are_applied_inside_the_kernel(caplog):
    """A key-padding mask (bool or additive, any broadcastable shape) hides keys inside the kernel: the
    result equals the kernel run on the kept keys alone (per batch row) and stays close to exact masked
    attention; garbage in hidden keys changes nothing; other masks still fall back to exact attention."""
    import logging

    from diffboost.kernels import quantized_attention

    torch.manual_seed(0)
    b, h, n, m, d = 2, 2, 40, 48, 16
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    lengths = [48, 30]
    keep = torch.zeros(b, 1, 1, m, dtype=torch.bool)
    for i, length in enumerate(lengths):
        keep[i, ..., :length] = True
    out = quantized_attention(q, k, v, attn_mask=keep, block_k=16)
    for i, length in enumerate(lengths):  # the same as the kernel on the kept keys only
        alone = quantized_attention(q[i:i + 1], k[i:i + 1, :, :length], v[i:i + 1, :, :length], block_k=16)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=1e-6)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.995
    garbage_k, garbage_v = k.clone(), v.clone()
    garbage_k[1, :, 30:] = 1e4
    garbage_v[1, :, 30:] = float("nan")
    assert torch.equal(quantized_attention(q, garbage_k, garbage_v, attn_mask=keep, block_k=16), out)
    additive = torch.zeros(b, m).masked_fill(~keep[:, 0, 0], float("-inf"))[:, None, None, :]
    assert torch.equal(quantized_attention(q, k, v, attn_mask=additive, block_k=16), out)
    finfo_min = torch.zeros(b, 1, 1, m).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert torch.equal(quantized_attention(q, k, v, attn_mask=finfo_min, block_k=16), out)
    # a mask that differs between queries, or a bias, is not a key-padding mask: exact attention
    bias = torch.randn(b, 1, n, m)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(quantized_attention(q, k, v, attn_mask=bias),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    small_bias = torch.full((b, 1, 1, m), 0.5)
    torch.testing.assert_close(quantized_attention(q, k, v, attn_mask=small_bias),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=small_bias))
