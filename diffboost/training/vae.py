"""Train the small shared VAE (64x64 RGB -> 16x16x16 latents) and cache latents of a fixed set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffboost.training.common import Timer, load_checkpoint, save_checkpoint, scene_batch, step_generator

logger = logging.getLogger(__name__)

VAE_SEED_OFFSET = 50_000_000  # scenes used to train the VAE
LATENT_SEED_OFFSET = 0  # scenes whose latents are cached for the denoisers


def build_vae(tiny: bool = False) -> AutoencoderKL:
    """3 levels, 16 latent channels: 64x64 images -> 16x16 latents."""
    channels = (8, 8, 8) if tiny else (32, 32, 64)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4 if tiny else 8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def train_vae(
    work_dir: Path,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    tiny: bool = False,
    ckpt_every_s: float = 240.0,
    noise_scale: float = 0.25,
) -> AutoencoderKL:
    """Train (or resume, continue, or load a finished) VAE under ``work_dir``; L1 + tiny KL.

    The decoder sees ``mean + noise_scale * std * eps``: the denoisers train on posterior means,
    so the decoder must above all be sharp at the mean.
    """
    final = work_dir / "vae.safetensors"
    meta_path = work_dir / "vae_meta.json"
    vae = build_vae(tiny)
    ckpt = work_dir / "vae.ckpt"
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = phase_start = 0
    if final.exists():
        vae.load_state_dict(load_file(str(final)))
        done = json.loads(meta_path.read_text())["steps"] if meta_path.exists() else steps
        if done >= steps:
            logger.info("VAE: loaded finished weights from %s (%d steps)", final, done)
            return vae.eval()
        start = phase_start = done  # continue a finished VAE for more steps (fresh optimizer)
        logger.info("VAE: continuing finished weights from step %d to %d", done, steps)
    if ckpt.exists():
        meta = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})
        start, phase_start = meta["step"], meta.get("phase_start", 0)
        logger.info("VAE: resumed at step %d", start)
    span = max(steps - phase_start, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * max(0.0, 1 - s / span))
    )
    for _ in range(start - phase_start):
        sched.step()
    timer = Timer(ckpt_every_s)
    vae.train()
    bar = tqdm(range(start, steps), desc="vae", mininterval=30, initial=start, total=steps)
    l1_avg = None
    for step in bar:
        g = step_generator(seed, step)
        seeds = (torch.randint(0, 10_000_000, (batch_size,), generator=g) + VAE_SEED_OFFSET).tolist()
        x, _ = scene_batch(seeds)
        post = vae.encode(x).latent_dist
        z = post.mean + noise_scale * post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1 = F.l1_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        l1_avg = l1.item() if l1_avg is None else 0.95 * l1_avg + 0.05 * l1.item()
        if step % 50 == 0:
            logger.info("VAE step %d l1 %.4f kl %.2f", step, l1_avg, kl.item())
        if timer.due():
            save_checkpoint(ckpt, {"vae": vae}, {"opt": opt}, {"step": step + 1, "phase_start": phase_start})
    vae.eval()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(final))
    meta_path.write_text(json.dumps({"steps": steps}))
    ckpt.unlink(missing_ok=True)
    logger.info("VAE: done, %s", final)
    return vae


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, n: int = 64) -> float:
    """Reconstruction PSNR (dB, on [0, 1]) over ``n`` held-out scenes."""
    x, _ = scene_batch(list(range(90_000_000, 90_000_000 + n)))
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean().item()
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL, work_dir: Path, num_images: int, batch_size: int = 64
) -> tuple[torch.Tensor, list[int]]:
    """Encode the fixed scene set once (posterior means); cached on disk. Returns latents and seeds."""
    path = work_dir / f"latents_{num_images}.safetensors"
    seeds = list(range(LATENT_SEED_OFFSET, LATENT_SEED_OFFSET + num_images))
    if path.exists():
        return load_file(str(path))["latents"], seeds
    chunks = []
    for i in tqdm(range(0, num_images, batch_size), desc="cache latents", mininterval=30):
        x, _ = scene_batch(seeds[i : i + batch_size])
        chunks.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(chunks).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file({"latents": latents}, str(tmp))
    tmp.replace(path)
    logger.info("cached %d latents -> %s", num_images, path)
    return latents, seeds
