"""Seconds per training step of the Flux reference transformer (+ both text encoders) on random data.

    python benchmarks/training_step_speed.py --threads 2 --batch-sizes 16 32 64 [--compile]

Forward + backward + AdamW at the reference model's size (2 double + 6 single blocks, 64 image and
16 text tokens), the median of 10 steps after 2 warm-up steps; the numbers quoted in
benchmarks/TRAINING.md ("The 90-minute budget, measured") come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from diffboost.training.common import build_tokenizer
from diffboost.training.train_flux import TEXT_LEN, build_text_encoders, build_transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (first step timed apart)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(TEXT_LEN)
    clip, t5 = build_text_encoders(len(tokenizer), 64)
    transformer = build_transformer(64)
    params = [*transformer.parameters(), *clip.parameters(), *t5.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    model = torch.compile(transformer) if args.compile else transformer
    for bs in args.batch_sizes:
        times = []
        for _ in range(12):
            start = time.perf_counter()
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
        print(f"threads {args.threads}, batch {bs}: {med:.3f} s/step, {bs / med:.1f} samples/s"
              f" (first step {times[0]:.1f} s{', compiled' if args.compile else ''})")


if __name__ == "__main__":
    main()
