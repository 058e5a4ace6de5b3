"""Cost of one Flux transformer call at two resolutions, and of the rest of a pipeline call.

    python benchmarks/flux_call_cost.py --model assets/flux-shapes-128 --sizes 128 64

Why bottleneck sampling's wall-clock speedup trails its FLOP reduction on a small model: a call at a
quarter of the image tokens is not a quarter of the time when a fixed per-call cost (Python, kernel
launches, embeddings, the text tokens) is a large share. Prints the median time of one transformer
call at each size (what each CFG branch costs per step; ``--batch N``: N images per call), the tokens
of each, the full pipeline call at the first size with the model's settings, the VAE decode and the
prompt encoding, and the same pipeline call with a denoiser that costs nothing (``fixed_share``: the
share of a call no cache can remove, for the hot-path efficiency in ``benchmarks/front.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from diffboost.cli import default_call_kwargs, load_pipeline, model_defaults

PROMPT = "a large red circle at the left on a white background"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("assets/flux-shapes-128"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 64], help="image sides in px")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--batch", type=int, default=1, help="images per transformer call (num_images_per_prompt)")
    args = ap.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.batch < 1:
        ap.error(f"--repeats, --steps and --batch must be >= 1, got {args.repeats}, {args.steps}, {args.batch}")
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(pipe, model_defaults(args.model))
    emb, pooled, txt_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=16)
    channels = pipe.transformer.config.in_channels
    factor = pipe.vae_scale_factor * 2  # px per packed token side
    if any(size < factor or size % factor for size in args.sizes):
        ap.error(f"--sizes must be multiples of {factor} px (one packed token's side for this model), got {args.sizes}")
    report: dict[str, object] = {"model": str(args.model), "threads": torch.get_num_threads(), "batch": args.batch}
    emb, pooled = emb.expand(args.batch, -1, -1), pooled.expand(args.batch, -1)
    for size in args.sizes:
        side = size // factor
        ids = pipe._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
        x = torch.randn(args.batch, side * side, channels)
        t = torch.full((args.batch,), 0.5)

        def call() -> object:
            return pipe.transformer(hidden_states=x, timestep=t, pooled_projections=pooled,
                                    encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=ids)

        report[f"transformer_ms_at_{size}px"] = round(1000 * median_time(call, args.repeats), 2)
        report[f"tokens_at_{size}px"] = {"image": side * side, "text": emb.shape[1]}
    size = args.sizes[0]
    latent = torch.randn(args.batch, pipe.vae.config.latent_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    report["vae_decode_ms"] = round(1000 * median_time(lambda: pipe.vae.decode(latent), args.repeats), 2)
    report["encode_prompt_ms"] = round(
        1000 * median_time(lambda: pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=16), args.repeats), 2)
    kwargs.update(height=size, width=size, num_inference_steps=args.steps, num_images_per_prompt=args.batch)
    report[f"pipeline_call_s_at_{size}px"] = round(median_time(
        lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs), max(3, args.repeats // 3)), 3)
    # the same call with a denoiser that costs nothing (zeros of the right shape): T_fixed, what no
    # cache removes (prompt encoding, the scheduler, per-step Python, the VAE); benchmarks/front.py
    # reads its share of the full call as --fixed-share
    def free_denoiser(hidden_states=None, *args, **kw):
        return (torch.zeros_like(hidden_states),)

    pipe.transformer.forward = free_denoiser
    try:
        report[f"pipeline_call_s_without_denoiser_at_{size}px"] = round(median_time(
            lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs), max(3, args.repeats // 3)), 3)
    finally:
        del pipe.transformer.forward
    report["fixed_share"] = round(report[f"pipeline_call_s_without_denoiser_at_{size}px"]
                                  / report[f"pipeline_call_s_at_{size}px"], 4)
    report["call_kwargs"] = {k: v for k, v in kwargs.items() if k != "generator"}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
