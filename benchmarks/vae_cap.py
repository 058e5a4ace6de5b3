"""What the shared VAE lets a model score: the evaluator on VAE reconstructions of unseen scenes.

    python benchmarks/vae_cap.py runs/flux/vae.700steps.safetensors runs/flux/vae.safetensors

For each VAE weights file: reconstruction PSNR and the evaluator's attribute accuracy on the
reconstructions (posterior means) of 256 held-out scenes: the ceiling of any denoiser's adherence.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from diffboost_reference.evaluation.classifier import load_evaluator
from diffboost_reference.evaluation.metrics import attribute_accuracy
from diffboost_reference.training.common import scene_batch
from diffboost_reference.training.vae import build_vae


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    evaluator = load_evaluator()
    x, captions = scene_batch(list(range(91_000_000, 91_000_256)))
    for path in paths:
        vae = build_vae()
        vae.load_state_dict(load_file(path))
        vae.eval()
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)])
        rec = rec.clamp(-1, 1)
        images = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        mse = ((rec - x) / 2).pow(2).mean().item()
        acc = attribute_accuracy(images, captions, evaluator)
        print(f"{path}: PSNR {10 * np.log10(1 / mse):.2f} dB, evaluator on reconstructions {json.dumps(acc)}")


if __name__ == "__main__":
    main(sys.argv[1:])
