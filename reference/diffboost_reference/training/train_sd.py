"""Train the tiny Stable-Diffusion-architecture reference model (UNet, v-prediction, DDIM).

Run ``python -m diffboost_reference.training.train_sd --out assets/sd-shapes --vae-dir runs/flux``: it reuses
(or trains) the shared VAE and its cached latents, trains a small ``UNet2DConditionModel`` and a
1-layer CLIP text encoder jointly with the v-prediction loss (10% empty captions, so classifier-free
guidance works), and saves a ``StableDiffusionPipeline`` with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from diffboost_reference.data import scenes
from diffboost_reference.training.common import (
    EMA,
    Timer,
    add_trainer_args,
    build_tokenizer,
    check_trainer_args,
    draw_scenes,
    load_checkpoint,
    lr_factor,
    object_share,
    optimizer_step,
    save_checkpoint,
    scene_draw_weights,
    setup_logging,
    step_generator,
    tokenize,
    weighted_mse,
)
from diffboost_reference.training.evaluate import export_checkpoint, generate_and_score, save_grid, save_pipeline
from diffboost_reference.training.vae import cache_latents, train_vae

logger = logging.getLogger(__name__)

TEXT_LEN = 16


def channels_problem(channels: list[int] | tuple[int, ...]) -> str | None:
    """Why ``channels`` cannot be a :func:`build_unet` width list (``--channels``), or None if it can."""
    groups = min(32, channels[0] // 2) if channels else 0  # the UNet's norm_num_groups (see build_unet)
    if not 2 <= len(channels) <= 4 or channels[0] < 8 or any(c % groups for c in channels):
        return (f"--channels takes 2-4 widths, the first >= 8, all divisible by min(32, first // 2) = {groups} "
                f"(group norm), got {list(channels)}")
    return None


def build_unet(text_width: int, tiny: bool = False, channels: tuple[int, ...] = (32, 64, 64),
               time_conditioning: str = "default") -> UNet2DConditionModel:
    """UNet on 16x16x16 latents, one level per entry of ``channels`` (3 levels: 16 -> 8 -> 4), with
    cross-attention at every level.

    The 4x4 bottom level lets zero padding tell every position where the image borders are, which the
    model needs to place an object "at the left" (the self-attention has no position encoding).
    ``addition_embed_type="text"``: an attention-pooled summary of the caption is added to the
    timestep embedding (diffusers' ``TextTimeEmbedding``), so global attributes (background, colour)
    reach every ResNet block, as Flux's pooled CLIP vector does through AdaLN. The pipeline is still a
    plain ``StableDiffusionPipeline`` (the embedding reads ``encoder_hidden_states``).

    ``time_conditioning``: how that embedding enters each ResNet block, diffusers'
    ``resnet_time_scale_shift``: ``"default"`` adds it as a bias (SD); ``"scale_shift"`` uses it as a
    per-channel scale and shift after the group norm (AdaGN of Dhariwal & Nichol 2021), so the caption
    can switch feature channels on and off, not only shift them.
    """
    channels = (16, 32) if tiny else tuple(channels)
    return UNet2DConditionModel(
        sample_size=16, in_channels=16, out_channels=16, layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        cross_attention_dim=text_width, attention_head_dim=4, norm_num_groups=8 if tiny else min(32, channels[0] // 2),
        addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift=time_conditioning,
    )


def build_text_encoder(vocab_size: int, width: int) -> CLIPTextModel:
    """1-layer CLIP whose last hidden state is the UNet's cross-attention context.

    Token embeddings start at unit scale (CLIP's default is std 0.02, as small as its position
    embeddings): with the default, every caption gave nearly the same context after the final layer
    norm, the UNet learned to ignore the text, and at step 1500 it drew the average scene.
    """
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=TEXT_LEN,
            pad_token_id=0, bos_token_id=0, eos_token_id=1,
        )
    )
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model


def build_scheduler(prediction_type: str = "v_prediction", zero_snr: bool = True) -> DDIMScheduler:
    """SD's scaled-linear betas; with ``zero_snr`` rescaled to zero terminal SNR and sampled with
    trailing timesteps (Lin et al., WACV 2024, "Common diffusion noise schedules and sample steps are flawed").

    Why: with the plain schedule x_T keeps sqrt(alpha_bar_999) = 6.8% of the image, enough for the
    model to read an object's position from the leaked signal in training; from pure noise at
    inference there is none, and position came out at chance (19% at step 2000). Needs v-prediction.
    """
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {}
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type, **extra,
    )


def make_pipeline(args: argparse.Namespace, vae, tokenizer, emas: dict[str, EMA]) -> StableDiffusionPipeline:
    """The EMA weights as a ``StableDiffusionPipeline`` (progress bar off)."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=emas["text"].shadow, tokenizer=tokenizer, unet=emas["unet"].shadow,
        scheduler=build_scheduler(args.prediction, args.zero_snr), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_defaults(args: argparse.Namespace) -> dict:
    """Call defaults shipped in ``diffboost.json``: the setting the model was evaluated with."""
    return {"height": 64, "width": 64, "steps": args.eval_steps, "guidance_scale": args.guidance}


def export(args: argparse.Namespace, vae, tokenizer, emas: dict[str, EMA], step: int, history: list) -> None:
    """Evaluate the checkpoint's EMA weights on ``--eval-prompts`` prompts and save the pipeline."""
    pipe = make_pipeline(args, vae, tokenizer, emas)
    export_checkpoint(pipe, args, step, history, {"guidance_scale": args.guidance}, model_defaults(args),
                      eval_guidance=args.guidance)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    add_trainer_args(p, out=Path("assets/sd-shapes"), work_dir=Path("runs/sd"), vae_dir=Path("runs/flux"), lr=8e-4)
    p.add_argument("--channels", type=int, nargs="+", default=(32, 64, 64), help="UNet width per level (2-4 levels)")
    p.add_argument("--drop-caption", type=float, default=0.1)
    p.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction",
                   help="v-prediction (default) weights the noisy steps, where the layout is decided, far more "
                        "than epsilon: with epsilon the model still ignored position and background at step 1500")
    p.add_argument("--zero-snr", action=argparse.BooleanOptionalAction, default=True,
                   help="zero terminal SNR noise schedule + trailing timesteps (default on; needs v-prediction)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--time-conditioning", choices=("default", "scale_shift"), default="default",
                   help="how the timestep + caption embedding enters the ResNet blocks: a bias (default, as "
                        "SD) or a scale and shift after the group norm (AdaGN); see build_unet")
    args = p.parse_args(argv)
    check_trainer_args(p, args)
    if (problem := channels_problem(args.channels)) is not None:
        p.error(problem)
    if args.zero_snr and args.prediction == "epsilon":
        p.error("--zero-snr needs --prediction v_prediction (epsilon is undefined at zero SNR); "
                "pass --no-zero-snr for an epsilon model")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.work_dir / "train.log")
    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    args.vae_dir.mkdir(parents=True, exist_ok=True)
    vae = train_vae(args.vae_dir, args.vae_steps, args.vae_batch, lr=args.vae_lr, seed=args.seed, tiny=args.tiny,
                    object_weight=args.vae_object_weight)
    device = args.device  # float32 on every device; data drawn on the CPU from the same seeded generators
    vae.requires_grad_(False).to(device)
    latents, seeds = cache_latents(vae, args.vae_dir, args.num_images)
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale, shift_factor=None)  # the SD pipeline applies no shift
    latents = (latents * scale).to(device)
    captions = [scenes.random_spec(random.Random(s)).caption for s in seeds]
    draw_weights = scene_draw_weights(captions, args.oversample_small)
    pixel_w = None
    if args.object_loss_weight > 0:  # (N, h, w): 1 + W x the object share of each latent pixel's cell
        cell = 2 ** (len(vae.config.block_out_channels) - 1)
        pixel_w = (1.0 + args.object_loss_weight * object_share(seeds, scenes.IMAGE_SIZE, cell)[:, 0]).to(device)
        logger.info("object-weighted loss: mean latent-pixel weight %.3f", pixel_w.mean().item())

    tokenizer = build_tokenizer(TEXT_LEN)
    text_encoder = build_text_encoder(len(tokenizer), args.text_width)
    unet = build_unet(args.text_width, args.tiny, tuple(args.channels), args.time_conditioning).to(device)
    text_encoder = text_encoder.to(device)
    ids = tokenize(tokenizer, captions, TEXT_LEN).to(device)
    empty = tokenize(tokenizer, [""], TEXT_LEN).to(device)
    noise_sched = build_scheduler(args.prediction, args.zero_snr)
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "lr": args.lr}, {"params": list(text_encoder.parameters()), "lr": args.text_lr}],
        weight_decay=0.0, betas=(0.9, 0.99),
    )
    base_lrs = [args.lr, args.text_lr]
    emas = {"unet": EMA(unet, args.ema), "text": EMA(text_encoder, args.ema)}
    modules = {"unet": unet, "text": text_encoder, "ema_unet": emas["unet"].shadow, "ema_text": emas["text"].shadow}
    ckpt = args.work_dir / "sd.ckpt"
    start, best, history = 0, -1.0, []
    if ckpt.exists():
        meta = load_checkpoint(ckpt, modules, {"opt": opt})
        start, best, history = meta["step"], meta["best"], meta["history"]
        logger.info("resumed at step %d (best adherence %.3f)", start, best)
    if args.export:
        export(args, vae, tokenizer, emas, start, history)
        return
    logger.info("unet %.2fM params", sum(p.numel() for p in unet.parameters()) / 1e6)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt, modules, {"opt": opt}, {"step": step, "best": best, "history": history})

    timer = Timer(args.ckpt_minutes * 60)
    loss_avg = None
    t_steps = time.monotonic()
    unet.train(), text_encoder.train()
    for step in tqdm(range(start, args.steps), desc="sd", mininterval=60, initial=start, total=args.steps):
        factor = lr_factor(step, 200, args.decay_from, args.decay_to, args.min_lr_ratio)
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * factor
        g = step_generator(args.seed, step)
        idx = draw_scenes(draw_weights, len(latents), args.batch_size, g).to(device)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=g).to(device)
        tok = ids[idx].clone()
        drop = (torch.rand(args.batch_size, generator=g) < args.drop_caption).to(device)
        tok[drop] = empty
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=text_encoder(tok).last_hidden_state).sample
        target = noise if args.prediction == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        loss = weighted_mse(pred, target, pixel_w[idx] if pixel_w is not None else None, dim=1)
        optimizer_step(opt, loss, {"unet": unet, "text": text_encoder}, emas, step)
        loss_now = loss.item()
        loss_avg = loss_now if loss_avg is None else 0.98 * loss_avg + 0.02 * loss_now
        done = step + 1
        if done % 50 == 0:
            logger.info("step %d loss %.4f (%.2f s/step)", done, loss_avg, (time.monotonic() - t_steps) / 50)
            t_steps = time.monotonic()
        last = done == args.steps
        over = args.max_minutes > 0 and time.monotonic() - t_start > args.max_minutes * 60
        if done % args.eval_every == 0 or last or over:
            pipe = make_pipeline(args, vae, tokenizer, emas)
            res = generate_and_score(pipe, args.eval_prompts, args.eval_steps, seed=args.seed,
                                     guidance_scale=args.guidance)
            save_grid(res["images"], args.work_dir / f"samples_{done:06d}.png")
            acc = res.get("accuracy")
            history.append({"step": done, "loss": loss_avg, "accuracy": acc})
            logger.info("eval step %d: %s", done, json.dumps(acc))
            score = acc["all"] if acc else 0.0
            if score >= best:
                best = score
                save_pipeline(pipe, args.out, {"step": done, "accuracy": acc, "loss": loss_avg,
                                               "eval_guidance": args.guidance, "eval_steps": args.eval_steps},
                              model_defaults(args))
            checkpoint(done)
            timer.last = time.monotonic()
        elif timer.due():
            checkpoint(done)
        if over:
            break
    logger.info("finished; best adherence %.3f", best)


if __name__ == "__main__":
    main()
