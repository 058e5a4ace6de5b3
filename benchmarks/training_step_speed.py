"""Seconds per training step of a reference denoiser (+ its text encoders) on random data.

    python benchmarks/training_step_speed.py --threads 2 --batch-sizes 16 32 64 [--compile] [--model sd]
        [--time-conditioning scale_shift] [--channels 64 64 64] [--heads 4 --head-dim 48 --blocks 2 6]

Forward + backward + AdamW at the reference models' sizes (Flux: 2 double + 6 single blocks, 64 image
and 16 text tokens; SD: the 3-level UNet on 16x16x16 latents), the median of 10 steps after 2 warm-up
steps; the numbers quoted in benchmarks/TRAINING.md ("What we learned about the training budget") come from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from diffboost_reference.training import train_sd
from diffboost_reference.training.common import build_tokenizer
from diffboost_reference.training.train_flux import TEXT_LEN, build_text_encoders, build_transformer, transformer_problem


def sd_step(unet, text_encoder, bs: int, vocab: int) -> torch.Tensor:
    x = torch.randn(bs, 16, 16, 16)
    ids = torch.randint(3, vocab, (bs, TEXT_LEN))
    pred = unet(x, torch.randint(0, 1000, (bs,)), encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
    return F.mse_loss(pred, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser (first step timed apart)")
    ap.add_argument("--model", choices=("flux", "sd"), default="flux")
    ap.add_argument("--time-conditioning", choices=("default", "scale_shift"), default="default",
                    help="SD only: the UNet's resnet_time_scale_shift (train_sd --time-conditioning)")
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64],
                    help="SD only: UNet width per level (train_sd --channels; default 32 64 64)")
    ap.add_argument("--heads", type=int, default=4, help="Flux only: attention heads (train_flux --heads)")
    ap.add_argument("--head-dim", type=int, default=32, help="Flux only: width of a head (train_flux --head-dim)")
    ap.add_argument("--blocks", type=int, nargs=2, default=[2, 6],
                    help="Flux only: double- and single-stream blocks (train_flux --blocks)")
    args = ap.parse_args()
    if args.model != "sd" and (args.channels != [32, 64, 64] or args.time_conditioning != "default"):
        ap.error("--channels and --time-conditioning apply to --model sd only")
    if args.model != "flux" and (args.heads != 4 or args.head_dim != 32 or args.blocks != [2, 6]):
        ap.error("--heads, --head-dim and --blocks apply to --model flux only")
    if (problem := train_sd.channels_problem(args.channels)) is not None:
        ap.error(problem)
    if (problem := transformer_problem(args.heads, args.head_dim, tuple(args.blocks))) is not None:
        ap.error(problem)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(TEXT_LEN)
    if args.model == "sd":
        denoiser = train_sd.build_unet(64, channels=tuple(args.channels), time_conditioning=args.time_conditioning)
        text = train_sd.build_text_encoder(len(tokenizer), 64)
        params = [*denoiser.parameters(), *text.parameters()]
    else:
        clip, t5 = build_text_encoders(len(tokenizer), 64)
        denoiser = build_transformer(64, heads=args.heads, head_dim=args.head_dim, blocks=tuple(args.blocks))
        params = [*denoiser.parameters(), *clip.parameters(), *t5.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    model = torch.compile(denoiser) if args.compile else denoiser
    for bs in args.batch_sizes:
        times = []
        for _ in range(12):
            start = time.perf_counter()
            if args.model == "sd":
                loss = sd_step(model, text, bs, len(tokenizer))
            else:
                x = torch.randn(bs, 64, 64)
                ids = torch.randint(3, len(tokenizer), (bs, TEXT_LEN))
                pred = model(
                    hidden_states=x, timestep=torch.rand(bs), pooled_projections=clip(ids).pooler_output,
                    encoder_hidden_states=t5(ids).last_hidden_state, txt_ids=torch.zeros(TEXT_LEN, 3),
                    img_ids=img_ids, return_dict=False,
                )[0]
                loss = F.mse_loss(pred, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        med = statistics.median(times[2:])
        print(f"{args.model} ({sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M): threads {args.threads}, batch {bs}: {med:.3f} s/step, {bs / med:.1f} samples/s"
              f" (first step {times[0]:.1f} s{', compiled' if args.compile else ''})")


if __name__ == "__main__":
    main()
