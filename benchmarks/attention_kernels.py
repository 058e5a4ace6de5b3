"""Issue #23: the attention kernels' accuracy on real activations and their speed on CPU.

Accuracy: the query/key/value of every self-attention call of one generation (every ``--every``-th
call kept) are captured from a reference model, then each kernel runs on them against exact
attention: cosine similarity and relative L1 = sum|o - o_ref| / sum|o_ref| (SageAttention's and
SpargeAttn's measures), and for the sparse kernel the share of (query, key) pairs it skipped.

Speed: attention alone, CPU, float32, one thread unless OMP_NUM_THREADS says otherwise, on
image-like inputs at 4,096 and 16,384 tokens (a 64x64 / 128x128 token grid whose features are smooth
functions of the position, random low-frequency Fourier features plus noise: neighbours attend to
each other, as in a diffusion transformer's later layers), against ``scaled_dot_product_attention``.

    OMP_NUM_THREADS=1 python benchmarks/attention_kernels.py accuracy --model assets/flux-shapes --out benchmarks/results/attention-kernels
    OMP_NUM_THREADS=1 python benchmarks/attention_kernels.py accuracy --model assets/flux-shapes-128 --size 512 --steps 4 --every 4 ...
    OMP_NUM_THREADS=1 python benchmarks/attention_kernels.py speed --tokens 4096 16384 --out benchmarks/results/attention-kernels
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffboost.kernels import quantized_attention, sparse_attention, sparsity

QUANT = {
    "int8-fp16": dict(qk_format="int8", pv_format="fp16"),
    "int8-fp8": dict(qk_format="int8", pv_format="fp8_e4m3"),
    "fp8-fp8": dict(qk_format="fp8_e4m3", pv_format="fp8_e4m3"),
}
SPARSE = {
    "tau0.95": dict(cdf_threshold=0.95),
    "tau0.9": dict(cdf_threshold=0.9),
    "tau0.98": dict(cdf_threshold=0.98),
    "topk0.5": dict(topk=0.5),
}


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().sum() / b.double().abs().sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def capture(model: str, size: int | None, every: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v) of the self-attention calls of one generation, every ``every``-th kept."""
    from diffboost.generation import default_call_kwargs, load_pipeline, model_defaults

    pipe = load_pipeline(Path(model))
    pipe.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(pipe, model_defaults(Path(model)))
    if size:
        kwargs["height"] = kwargs["width"] = size
    kept: list[tuple[torch.Tensor, ...]] = []
    seen = [0]
    inside = [False]  # only the denoiser's attention (not the text encoders' or the VAE's)
    original = F.scaled_dot_product_attention
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    denoiser.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    denoiser.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def spy(query, key, value, attn_mask=None, *args, **kw):
        if inside[0] and attn_mask is None and query.shape[-2] == key.shape[-2]:
            if seen[0] % every == 0:
                kept.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
            seen[0] += 1
        return original(query, key, value, attn_mask, *args, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        pipe(prompt="a large red circle at the left on a white background", num_inference_steps=steps,
             generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return kept


def accuracy(args: argparse.Namespace) -> dict:
    calls = capture(args.model, args.size, args.every, args.steps)
    rows: dict[str, dict[str, list[float]]] = {}
    for q, k, v in calls:
        ref = F.scaled_dot_product_attention(q, k, v)
        for name, kw in QUANT.items():
            out = quantized_attention(q, k, v, **kw)
            r = rows.setdefault(f"quantized {name}", {"cos": [], "l1": []})
            r["cos"].append(cosine(out, ref))
            r["l1"].append(rel_l1(out, ref))
        for name, kw in SPARSE.items():
            out, keep = sparse_attention(q, k, v, return_keep=True, **kw)
            r = rows.setdefault(f"sparse {name}", {"cos": [], "l1": [], "sparsity": []})
            r["cos"].append(cosine(out, ref))
            r["l1"].append(rel_l1(out, ref))
            r["sparsity"].append(sparsity(keep, q.shape[2], k.shape[2], 128, 64))
    tokens = sorted({q.shape[2] for q, _, _ in calls})
    summary = {"model": args.model, "size": args.size, "steps": args.steps, "calls": len(calls), "tokens": tokens,
               "heads": calls[0][0].shape[1] if calls else None, "head_dim": calls[0][0].shape[-1] if calls else None,
               "kernels": {}}
    for name, r in rows.items():
        summary["kernels"][name] = {
            "cos_mean": statistics.fmean(r["cos"]), "cos_min": min(r["cos"]),
            "l1_mean": statistics.fmean(r["l1"]), "l1_max": max(r["l1"]),
            **({"sparsity_mean": statistics.fmean(r["sparsity"])} if "sparsity" in r else {}),
        }
    return summary


def image_like(tokens: int, heads: int = 4, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    side = int(math.isqrt(tokens))
    assert side * side == tokens, "tokens must be a square"
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1)  # (tokens, 2)
    out = []
    for _ in range(3):
        freq = torch.randn(heads, 2, dim // 2, generator=g) * 6.0  # low frequencies: a few periods per image
        phase = torch.rand(heads, 1, dim // 2, generator=g) * 2 * math.pi
        ang = pos[None] @ freq + phase
        feat = torch.cat([ang.sin(), ang.cos()], -1) * 2.0  # (heads, tokens, dim)
        out.append((feat + 0.3 * torch.randn(feat.shape, generator=g))[None].contiguous())
    return tuple(out)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> dict:
    results = {"threads": torch.get_num_threads(), "rows": []}
    for n in args.tokens:
        q, k, v = image_like(n)
        ref = F.scaled_dot_product_attention(q, k, v)
        t_ref = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        results["rows"].append({"tokens": n, "kernel": "sdpa", "seconds": t_ref, "speedup": 1.0})
        side = int(math.isqrt(n))
        cases = [(f"sparse {name} blocks", lambda kw=kw: sparse_attention(q, k, v, return_keep=True, **kw))
                 for name, kw in SPARSE.items()]
        cases += [(f"sparse {name} blocks, 8x8 tiles",
                   lambda kw=kw: sparse_attention(q, k, v, return_keep=True, order="tiles", grid=(1, side, side),
                                                  tile=(1, 8, 8), **kw))
                  for name, kw in SPARSE.items() if name in ("tau0.95", "tau0.9")]
        cases += [("quantized int8-fp16 reference", lambda: quantized_attention(q, k, v)),
                  ("quantized int8-fp16 int8 products", lambda: quantized_attention(q, k, v, impl="int8"))]
        if args.flex:
            cases.append(("sparse tau0.95 flex (compiled)",
                          lambda: sparse_attention(q, k, v, block_k=128, impl="flex", return_keep=True)))
        for name, fn in cases:
            out = fn()
            keep = None
            if isinstance(out, tuple):
                out, keep = out
            t = timed(fn, args.repeats)
            row = {"tokens": n, "kernel": name, "seconds": t, "speedup": t_ref / t, "rel_l1": rel_l1(out, ref),
                   "cos": cosine(out, ref)}
            if keep is not None:
                bk = 128 if "flex" in name else 64
                row["sparsity"] = sparsity(keep, n, n, 128, bk)
            results["rows"].append(row)
            print(json.dumps(row))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--model", default="assets/flux-shapes")
    a.add_argument("--size", type=int, default=None)
    a.add_argument("--steps", type=int, default=28)
    a.add_argument("--every", type=int, default=7, help="keep every N-th self-attention call")
    s = sub.add_parser("speed")
    s.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--flex", action="store_true", help="also time compiled flex attention (compiles for tens of seconds)")
    for x in (a, s):
        x.add_argument("--out", type=Path, default=Path("benchmarks/results/attention-kernels"))
    args = p.parse_args()
    result = accuracy(args) if args.what == "accuracy" else speed(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = (f"accuracy-{Path(args.model).name}-{args.size or 'native'}.json" if args.what == "accuracy"
            else f"speed-{'-'.join(map(str, args.tokens))}.json")
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result if args.what == "accuracy" else {"written": str(args.out / name)}, indent=2))


if __name__ == "__main__":
    main()
