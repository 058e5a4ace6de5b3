"""Train the small shared VAE (64x64 RGB -> 16x16x16 latents) and cache latents of a fixed set."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffboost_reference.training.common import (
    Timer,
    load_checkpoint,
    object_mask,
    save_checkpoint,
    scene_batch,
    step_generator,
)

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
    object_weight: float = 0.0,
) -> AutoencoderKL:
    """Train (or resume, continue, or load a finished) VAE under ``work_dir``; L1 + tiny KL.

    The decoder sees ``mean + noise_scale * std * eps``: the denoisers train on posterior means,
    so the decoder must above all be sharp at the mean. ``object_weight > 0`` switches the loss to
    :func:`reconstruction_loss` (L1 + MSE + ``object_weight`` x the object-pixel L1), which keeps
    object colours apart from the first step (the plain-L1 recipe merged green and blue).
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
        rec_loss = reconstruction_loss(rec, x, object_weight) if object_weight > 0 else l1
        loss = rec_loss + kl_weight * kl
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
    x = x.to(vae.device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean().item()
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL, work_dir: Path, num_images: int, batch_size: int = 64, size: int = 64
) -> tuple[torch.Tensor, list[int]]:
    """Encode the fixed scene set once (posterior means) at ``size`` px; cached on disk. Returns latents
    and seeds.

    The file name carries the encoder version of ``vae_meta.json`` (bumped by :func:`finetune_vae`),
    so a re-trained encoder never reads latents of an older one, and the size when it is not 64.
    """
    version = encoder_version(work_dir)
    suffix = (f"_e{version}" if version else "") + (f"_px{size}" if size != 64 else "")
    path = work_dir / f"latents_{num_images}{suffix}.safetensors"
    seeds = list(range(LATENT_SEED_OFFSET, LATENT_SEED_OFFSET + num_images))
    if path.exists():
        return load_file(str(path))["latents"], seeds
    chunks = []
    for i in tqdm(range(0, num_images, batch_size), desc="cache latents", mininterval=30):
        x, _ = scene_batch(seeds[i : i + batch_size], size)
        chunks.append(vae.encode(x.to(vae.device)).latent_dist.mean.cpu())
    latents = torch.cat(chunks).contiguous()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two trainers may build the cache at once
    save_file({"latents": latents}, str(tmp))
    tmp.replace(path)
    logger.info("cached %d latents -> %s", num_images, path)
    return latents, seeds


def encoder_version(work_dir: Path) -> int:
    """How many times the encoder of the VAE under ``work_dir`` was fine-tuned (0: as first trained)."""
    meta_path = work_dir / "vae_meta.json"
    return int(json.loads(meta_path.read_text()).get("encoder_version", 0)) if meta_path.is_file() else 0


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE on [-1, 1] images, plus ``object_weight`` x the L1 over object pixels only."""
    loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    if object_weight > 0:
        mask = object_mask(x)
        loss = loss + object_weight * ((rec - x).abs() * mask).sum() / (3 * mask.sum()).clamp_min(1)
    return loss


def save_weights(vae: AutoencoderKL, path: Path) -> None:
    """Save the VAE's weights to ``path`` (safetensors) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp))
    tmp.replace(path)


def finetune_decoder(
    work_dir: Path,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    noise_scale: float = 0.25,
    ckpt_every_s: float = 240.0,
    object_weight: float = 0.0,
) -> AutoencoderKL:
    """Train only the decoder (and ``post_quant_conv``) of the finished VAE under ``work_dir``.

    The encoder stays frozen, so cached latents and every denoiser trained on them stay valid; only
    the pixels decoded from a latent get better. Loss: L1 + MSE on [-1, 1] images, plus
    ``object_weight`` times the L1 over object pixels only (see ``object_mask``): objects cover 2-20%
    of a scene, so a plain L1 spends its gradient on the background while the colour of small objects
    is what the evaluator reads. Resumable; the result replaces ``vae.safetensors`` atomically and
    ``vae_meta.json`` records ``decoder_steps``.
    """
    final = work_dir / "vae.safetensors"
    meta_path = work_dir / "vae_meta.json"
    if not final.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"no finished VAE in {work_dir} (vae.safetensors + vae_meta.json): train it first with "
            "python -m diffboost_reference.training.train_flux (its first stage), then fine-tune the decoder"
        )
    meta = json.loads(meta_path.read_text())
    vae = build_vae()
    vae.load_state_dict(load_file(str(final)))
    done = int(meta.get("decoder_steps", 0))
    if done >= steps:
        logger.info("decoder: already fine-tuned for %d steps", done)
        return vae.eval()
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ckpt = work_dir / "decoder.ckpt"
    start = done
    if ckpt.exists():
        start = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})["step"]
        logger.info("decoder: resumed at step %d", start)
    span = max(steps - done, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / span, 1.0))))
    )
    for _ in range(start - done):
        sched.step()
    timer = Timer(ckpt_every_s)
    vae.encoder.eval()
    vae.decoder.train()
    err_avg = None
    for step in tqdm(range(start, steps), desc="decoder", mininterval=30, initial=start, total=steps):
        g = step_generator(seed + 7, step)
        seeds = (torch.randint(0, 10_000_000, (batch_size,), generator=g) + VAE_SEED_OFFSET).tolist()
        x, _ = scene_batch(seeds)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + noise_scale * post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x, object_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        err_avg = loss.item() if err_avg is None else 0.95 * err_avg + 0.05 * loss.item()
        if step % 50 == 0:
            logger.info("decoder step %d loss %.4f", step, err_avg)
        if timer.due():
            save_checkpoint(ckpt, {"vae": vae}, {"opt": opt}, {"step": step + 1})
    vae.eval()
    save_weights(vae, final)
    meta["decoder_steps"] = steps
    meta.setdefault("decoder_object_weight", {})[str(steps)] = object_weight
    meta_path.write_text(json.dumps(meta))
    ckpt.unlink(missing_ok=True)
    logger.info("decoder: done after %d steps, PSNR %.2f dB", steps, vae_psnr(vae, 128))
    return vae


def finetune_vae(
    work_dir: Path,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-4,
    seed: int = 0,
    noise_scale: float = 0.25,
    object_weight: float = 1.0,
    anchor_weight: float = 0.1,
    kl_weight: float = 1e-6,
    ckpt_every_s: float = 240.0,
) -> AutoencoderKL:
    """Fine-tune encoder and decoder of the finished VAE under ``work_dir`` for ``steps`` more steps.

    For when the encoder itself loses information, e.g. maps two colours to nearly the same latent
    (no decoder can then tell them apart). Loss: L1 + MSE + ``object_weight`` x object-pixel L1
    (see :func:`finetune_decoder`) + ``kl_weight`` x KL + ``anchor_weight`` x the anchor
    ||mu - mu_ref||^2 / var(mu_ref), mu_ref being the posterior mean of the VAE before this run: it keeps
    the latent space close to the one the denoisers learned, so fine-tuning them on the new latents
    is short. The encoder changes, so the run bumps ``encoder_version`` in ``vae_meta.json``: the
    latent cache is rebuilt and the denoisers must be fine-tuned on it. Resumable; the result
    replaces ``vae.safetensors`` atomically; the previous weights stay as
    ``vae.e<version>.safetensors``.
    """
    final = work_dir / "vae.safetensors"
    meta_path = work_dir / "vae_meta.json"
    if not final.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no finished VAE in {work_dir} (vae.safetensors + vae_meta.json): train it first")
    meta = json.loads(meta_path.read_text())
    version = int(meta.get("encoder_version", 0))
    reference = work_dir / f"vae.e{version}.safetensors"
    if not reference.is_file():
        tmp = reference.with_name(reference.name + ".tmp")
        tmp.write_bytes(final.read_bytes())
        tmp.replace(reference)
    ref = build_vae()
    ref.load_state_dict(load_file(str(reference)))
    ref.requires_grad_(False).eval()
    vae = build_vae()
    vae.load_state_dict(load_file(str(reference)))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt = work_dir / "vae_finetune.ckpt"
    start = 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})["step"]
        logger.info("VAE fine-tune: resumed at step %d", start)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    for _ in range(start):
        sched.step()
    timer = Timer(ckpt_every_s)
    vae.train()
    avg = None
    for step in tqdm(range(start, steps), desc="vae fine-tune", mininterval=30, initial=start, total=steps):
        g = step_generator(seed + 11, step)
        seeds = (torch.randint(0, 10_000_000, (batch_size,), generator=g) + VAE_SEED_OFFSET).tolist()
        x, _ = scene_batch(seeds)
        post = vae.encode(x).latent_dist
        with torch.no_grad():
            mu_ref = ref.encode(x).latent_dist.mean
        z = post.mean + noise_scale * post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = (
            reconstruction_loss(rec, x, object_weight)
            + anchor_weight * (post.mean - mu_ref).pow(2).mean() / mu_ref.var()
            + kl_weight * post.kl().mean() / x[0].numel()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0:
            logger.info("VAE fine-tune step %d loss %.4f", step, avg)
        if timer.due():
            save_checkpoint(ckpt, {"vae": vae}, {"opt": opt}, {"step": step + 1})
    vae.eval()
    save_weights(vae, final)
    meta["encoder_version"] = version + 1
    meta.setdefault("encoder_finetunes", []).append(
        {"steps": steps, "lr": lr, "object_weight": object_weight, "anchor_weight": anchor_weight}
    )
    meta_path.write_text(json.dumps(meta))
    ckpt.unlink(missing_ok=True)
    logger.info("VAE fine-tune: done after %d steps, PSNR %.2f dB, encoder version %d", steps, vae_psnr(vae, 128),
                version + 1)
    return vae


def main(argv: list[str] | None = None) -> None:
    """``python -m diffboost_reference.training.vae --work-dir runs/flux (--decoder-steps N | --encoder-steps N)``."""
    import argparse

    from diffboost_reference.training.common import setup_logging

    p = argparse.ArgumentParser(
        description="Fine-tune the shared VAE: decoder only (--decoder-steps) or encoder + decoder (--encoder-steps)."
    )
    p.add_argument("--work-dir", type=Path, default=Path("runs/flux"))
    p.add_argument("--decoder-steps", type=int, default=0, help="total decoder fine-tuning steps")
    p.add_argument("--encoder-steps", type=int, default=0,
                   help="fine-tune encoder + decoder for this many steps (changes the latents; see finetune_vae)")
    p.add_argument("--anchor-weight", type=float, default=None,
                   help="weight of the latent anchor (encoder fine-tune; default: finetune_vae's, 0.1)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: finetune_decoder's 1e-3, finetune_vae's 3e-4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--object-weight", type=float, default=None,
        help="weight of the object-pixel L1 term (0 = plain L1 + MSE; default: finetune_decoder's 0, finetune_vae's 1)",
    )
    args = p.parse_args(argv)
    if bool(args.decoder_steps) == bool(args.encoder_steps):
        p.error("pass exactly one of --decoder-steps (decoder only) and --encoder-steps (encoder + decoder)")
    for name in ("decoder_steps", "encoder_steps", "object_weight", "anchor_weight"):
        if (getattr(args, name) or 0) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if (args.lr is not None and args.lr <= 0) or args.batch_size < 1:
        p.error(f"--lr must be > 0 and --batch-size >= 1, got {args.lr} and {args.batch_size}")
    if args.anchor_weight is not None and not args.encoder_steps:
        p.error("--anchor-weight applies to --encoder-steps only")
    torch.set_num_threads(args.threads)
    setup_logging(args.work_dir / "decoder.log")
    vae = build_vae()
    vae.load_state_dict(load_file(str(args.work_dir / "vae.safetensors")))
    logger.info("VAE: PSNR before %.2f dB", vae_psnr(vae.eval(), 128))
    # unset options fall through to the fine-tune function's own defaults (one place for them)
    given = {k: v for k, v in (("lr", args.lr), ("object_weight", args.object_weight),
                               ("anchor_weight", args.anchor_weight)) if v is not None}
    if args.encoder_steps:
        finetune_vae(args.work_dir, args.encoder_steps, args.batch_size, **given)
    else:
        finetune_decoder(args.work_dir, args.decoder_steps, args.batch_size, **given)


if __name__ == "__main__":
    main()
