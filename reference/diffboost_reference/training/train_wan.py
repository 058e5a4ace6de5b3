"""Train the reference text-to-video model: a small ``WanPipeline`` on procedural clips.

``python -m diffboost_reference.training.train_wan --out assets/wan-shapes`` runs three stages, each
resumable from files under ``--work-dir`` (rerun the same command after an interruption):

1. the video VAE (``AutoencoderKLWan``: 8x spatial, 2x temporal compression, so 9 frames of 64 x 64
   become 5 x 8 x 8 latents), L1 + MSE reconstruction and a small KL term, on clips of
   :mod:`diffboost_reference.data.videos`; saved as ``WORK/vae``;
2. the latents of ``--num-clips`` training clips, cached with their captions; their per-channel mean
   and standard deviation become the VAE's ``latents_mean`` / ``latents_std`` (the pipeline's
   normalisation);
3. flow matching of ``WanTransformer3DModel`` (patch 1 x 2 x 2: 80 tokens per clip) and a small
   UMT5 text encoder, with EMA weights; every ``--eval-every`` steps the EMA pipeline generates the
   held-out captions and the video evaluator (:mod:`diffboost_reference.evaluation.videos`) scores
   shape, colour and motion; the best pipeline so far is saved to ``--out`` (``save_pretrained``,
   safetensors) with ``diffboost.json`` (size, frames, steps, guidance) next to it.

benchmarks/TRAINING.md ("Reference video model") records the recipe and its measured time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from diffboost_reference.data import videos
from diffboost_reference.training.common import (
    EMA,
    Timer,
    build_tokenizer,
    load_checkpoint,
    lr_factor,
    optimizer_step,
    resolve_device,
    save_checkpoint,
    setup_logging,
    step_generator,
    tokenize,
)
from diffboost_reference.training.evaluate import save_pipeline

logger = logging.getLogger(__name__)

TEXT_LEN = 16
FRAMES = videos.FRAMES
VAE_SEED_OFFSET = 60_000_000  # clips that train the VAE (the denoiser's come from videos.TRAIN_SEED_BASE)


def build_vae(tiny: bool = False) -> AutoencoderKLWan:
    """8x spatial (three 2x stages), 2x temporal (the middle stage): 9 x 64 x 64 -> 5 x 8 x 8 x ``z_dim``."""
    z = 4 if tiny else 8
    return AutoencoderKLWan(
        base_dim=4 if tiny else 16, z_dim=z, dim_mult=[1, 1, 1, 1] if tiny else [1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, False], scale_factor_temporal=2, scale_factor_spatial=8,
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )


def build_text_encoder(vocab_size: int, width: int, tiny: bool = False) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=1 if tiny else 2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def build_transformer(z_dim: int, text_width: int, tiny: bool = False, heads: int = 4, head_dim: int = 32,
                      layers: int = 4) -> WanTransformer3DModel:
    if tiny:
        heads, head_dim, layers = 2, 12, 1
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=z_dim,
        out_channels=z_dim, text_dim=text_width, freq_dim=64, ffn_dim=4 * heads * head_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


def build_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def clips_tensor(seeds: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Clips as ``(N, 3, frames, 64, 64)`` in [-1, 1] and their captions."""
    clips = [videos.make_clip(s) for s in seeds]
    x = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return x, [c.caption for c in clips]


def train_vae(args: argparse.Namespace, device: torch.device) -> AutoencoderKLWan:
    """Stage 1 (resumable): returns the trained VAE, from ``WORK/vae`` when it is already there."""
    folder = args.work_dir / "vae"
    if (folder / "config.json").is_file():
        return AutoencoderKLWan.from_pretrained(str(folder), use_safetensors=True).to(device)
    vae = build_vae(args.tiny).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt = args.work_dir / "vae.ckpt"
    start = 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})["step"]
        logger.info("VAE resumed at step %d", start)
    timer = Timer(args.ckpt_minutes * 60)
    t0 = time.monotonic()
    vae.train()
    for step in range(start, args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * lr_factor(step, 50, args.vae_steps // 2, args.vae_steps)
        seeds = [VAE_SEED_OFFSET + step * args.vae_batch + i for i in range(args.vae_batch)]
        x, _ = clips_tensor(seeds)
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=step_generator(args.seed, step))).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % 25 == 0:
            logger.info("VAE step %d loss %.4f (%.2f s/step)", done, loss.item(), (time.monotonic() - t0) / (done - start))
        if timer.due() or over_time(args):
            save_checkpoint(ckpt, {"vae": vae}, {"opt": opt}, {"step": done})
            if over_time(args):
                raise TimeUp(f"VAE step {done}")
    vae.eval().requires_grad_(False)
    logger.info("VAE reconstruction PSNR %.2f dB on held-out clips", vae_psnr(vae, device))
    vae.save_pretrained(str(folder), safe_serialization=True)
    return vae


class TimeUp(Exception):
    """``--max-minutes`` ran out (everything is checkpointed; rerun the command to continue)."""


_STARTED = time.monotonic()


def over_time(args: argparse.Namespace) -> bool:
    return args.max_minutes > 0 and (time.monotonic() - _STARTED) / 60 >= args.max_minutes


@torch.no_grad()
def vae_psnr(vae: AutoencoderKLWan, device: torch.device, n: int = 8) -> float:
    x, _ = clips_tensor(list(range(500_000, 500_000 + n)))
    rec = vae.decode(vae.encode(x.to(device)).latent_dist.mode()).sample.clamp(-1, 1).cpu()
    mse = ((rec - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def cache_latents(vae: AutoencoderKLWan, args: argparse.Namespace, device: torch.device
                  ) -> tuple[torch.Tensor, list[str]]:
    """Stage 2 (resumable per chunk): ``(N, z, 5, 8, 8)`` latents (posterior means) and captions."""
    path = args.work_dir / f"latents_{args.num_clips}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return data["latents"], json.loads((args.work_dir / f"captions_{args.num_clips}.json").read_text())
    chunks, captions = [], []
    for start in range(0, args.num_clips, 64):
        seeds = list(range(videos.TRAIN_SEED_BASE + start, videos.TRAIN_SEED_BASE + min(args.num_clips, start + 64)))
        x, caps = clips_tensor(seeds)
        chunks.append(vae.encode(x.to(device)).latent_dist.mode().cpu())
        captions += caps
    latents = torch.cat(chunks)
    torch.save({"latents": latents}, path)
    (args.work_dir / f"captions_{args.num_clips}.json").write_text(json.dumps(captions))
    logger.info("cached %d latents %s", len(latents), tuple(latents.shape[1:]))
    return latents, captions


def make_pipeline(vae, text_encoder, tokenizer, transformer, shift: float) -> WanPipeline:
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=build_scheduler(shift),
                       transformer=transformer)


def model_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """``diffboost.json``: the settings the shipped model was evaluated with."""
    return {"height": 64, "width": 64, "num_frames": FRAMES, "steps": args.eval_steps,
            "guidance_scale": args.eval_cfg, "max_sequence_length": TEXT_LEN}


@torch.no_grad()
def evaluate(pipe: WanPipeline, args: argparse.Namespace) -> dict[str, float]:
    from diffboost_reference.evaluation.videos import video_accuracy

    specs = videos.held_out(args.eval_prompts)
    captions = [s.caption() for s in specs]
    clips = []
    for i in range(0, len(captions), 8):
        out = pipe(prompt=captions[i:i + 8], num_frames=FRAMES, height=64, width=64,
                   num_inference_steps=args.eval_steps, guidance_scale=args.eval_cfg, max_sequence_length=TEXT_LEN,
                   output_type="np", generator=torch.Generator().manual_seed(args.seed + i))
        clips += list(out.frames)
    return video_accuracy(clips, captions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("assets/wan-shapes"))
    p.add_argument("--work-dir", type=Path, default=Path("runs/wan"))
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--num-clips", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shift", type=float, default=2.0, help="flow-matching time shift (training and sampler)")
    p.add_argument("--drop-caption", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--decay-from", type=int, default=10_000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-cfg", type=float, default=4.0, help="guidance_scale of the evaluation (1: no CFG)")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (checkpointed) after this long; 0 = no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models, for tests")
    args = p.parse_args(argv)
    for name in ("vae_steps", "vae_batch", "num_clips", "steps", "batch_size", "eval_every", "eval_prompts",
                 "eval_steps", "text_width", "heads", "head_dim", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.text_width % 4 or args.head_dim % 4:
        p.error("--text-width and --head-dim must be multiples of 4")
    for name in ("lr", "text_lr", "vae_lr", "shift"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name.replace('_', '-')} must be a positive number")
    if not 0 <= args.drop_caption < 1:
        p.error("--drop-caption must be in [0, 1)")
    if args.eval_cfg < 1:
        p.error("--eval-cfg must be >= 1 (1 = no CFG)")
    args.device = resolve_device(p, args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    global _STARTED
    args = parse_args(argv)
    _STARTED = time.monotonic()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.work_dir / "train.log")
    torch.manual_seed(args.seed)
    device = args.device
    try:
        vae = train_vae(args, device)
        latents, captions = cache_latents(vae, args, device)
    except TimeUp as stop:
        logger.info("stopped after %.1f minutes in %s; rerun the same command to continue", args.max_minutes, stop)
        return
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    x_all = ((latents - mean[None, :, None, None, None]) / std[None, :, None, None, None]).to(device)

    tokenizer = build_tokenizer(TEXT_LEN, videos.vocabulary())
    text_encoder = build_text_encoder(len(tokenizer), args.text_width, args.tiny).to(device)
    transformer = build_transformer(vae.config.z_dim, args.text_width, args.tiny, args.heads, args.head_dim,
                                    args.layers).to(device)
    ids_all = tokenize(tokenizer, captions, TEXT_LEN).to(device)
    empty = tokenize(tokenizer, [""], TEXT_LEN).to(device)
    opt = torch.optim.AdamW([{"params": list(transformer.parameters()), "lr": args.lr},
                             {"params": list(text_encoder.parameters()), "lr": args.text_lr}],
                            weight_decay=0.0, betas=(0.9, 0.99))
    base_lrs = [args.lr, args.text_lr]
    emas = {"transformer": EMA(transformer, args.ema), "text": EMA(text_encoder, args.ema)}
    modules = {"transformer": transformer, "text": text_encoder, **{f"ema_{k}": e.shadow for k, e in emas.items()}}
    ckpt = args.work_dir / "wan.ckpt"
    start, best, history = 0, -1.0, []
    if ckpt.exists():
        meta = load_checkpoint(ckpt, modules, {"opt": opt})
        start, best, history = meta["step"], meta["best"], meta["history"]
        logger.info("resumed at step %d (best %.3f)", start, best)
    logger.info("transformer %.2fM params, text encoder %.2fM, %d cached clips",
                sum(p.numel() for p in transformer.parameters()) / 1e6,
                sum(p.numel() for p in text_encoder.parameters()) / 1e6, len(x_all))

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt, modules, {"opt": opt}, {"step": step, "best": best, "history": history})

    timer = Timer(args.ckpt_minutes * 60)
    t_steps = time.monotonic()
    transformer.train(), text_encoder.train()
    loss_avg = None
    for step in range(start, args.steps):
        factor = lr_factor(step, 200, args.decay_from, args.steps)
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * factor
        g = step_generator(args.seed, step)
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=g).to(device)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.sigmoid(torch.randn(args.batch_size, generator=g))
        t = (args.shift * t / (1 + (args.shift - 1) * t)).to(device)
        ids = ids_all[idx].clone()
        drop = (torch.rand(args.batch_size, generator=g) < args.drop_caption).to(device)
        ids[drop] = empty
        xt = (1 - t[:, None, None, None, None]) * x0 + t[:, None, None, None, None] * noise
        text = text_encoder(ids).last_hidden_state
        pred = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(opt, loss, {"transformer": transformer, "text": text_encoder}, emas, step)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        done = step + 1
        if done % 50 == 0:
            logger.info("step %d loss %.4f (%.2f s/step)", done, loss_avg, (time.monotonic() - t_steps) / 50)
            t_steps = time.monotonic()
        last, over = done == args.steps, over_time(args)
        if done % args.eval_every == 0 or last:
            pipe = make_pipeline(vae, emas["text"].shadow, tokenizer, emas["transformer"].shadow, args.shift)
            pipe.set_progress_bar_config(disable=True)
            t_eval = time.monotonic()
            acc = evaluate(pipe, args)
            history.append({"step": done, "loss": loss_avg, "accuracy": acc,
                            "minutes": (time.monotonic() - _STARTED) / 60})
            logger.info("eval step %d (%.0f s): %s", done, time.monotonic() - t_eval, json.dumps(acc))
            if acc["all"] >= best:
                best = acc["all"]
                info = {"step": done, "accuracy": acc, "eval_prompts": args.eval_prompts,
                        "args": {k: str(v) for k, v in vars(args).items()}}
                save_pipeline(pipe, args.out, info, model_defaults(args))
            checkpoint(done)
            timer.last = time.monotonic()
        elif timer.due() or over:
            checkpoint(done)
        if over and not last:
            logger.info("stopped after %.1f minutes at step %d; rerun the same command to continue", args.max_minutes,
                        done)
            return
    logger.info("finished; best held-out accuracy %.3f", best)


if __name__ == "__main__":
    main()
