"""Train the tiny Flux-architecture reference text-to-image model on procedural scenes.

Run ``python -m diffboost_reference.training.train_flux --out assets/flux-shapes``. Stages (all resumable
from files under ``--work-dir``): VAE training, latent caching, then joint flow-matching training
of the transformer and both text encoders. The pipeline is saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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
    save_checkpoint,
    scene_draw_weights,
    setup_logging,
    step_generator,
    tokenize,
    weighted_mse,
)
from diffboost_reference.training.evaluate import export_checkpoint, generate_and_score, save_grid, save_pipeline
from diffboost_reference.training.vae import cache_latents, train_vae, vae_psnr

logger = logging.getLogger(__name__)

TEXT_LEN = 16


def build_text_encoders(vocab_size: int, width: int, tiny: bool = False) -> tuple[CLIPTextModel, T5EncoderModel]:
    """1-layer CLIP (its pooled EOS state drives AdaLN) and a small T5 encoder (sequence tokens)."""
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            projection_dim=width,
            num_hidden_layers=1,
            num_attention_heads=4 if not tiny else 2,
            max_position_embeddings=TEXT_LEN,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=width // 4,
            d_ff=2 * width,
            num_layers=1 if tiny else 2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return clip, t5


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of one head over (text index, row, column): a quarter (even) for the first axis, the
    rest halved between rows and columns: 32 -> (8, 12, 12), the shipped model's split."""
    first = head_dim // 4 // 2 * 2
    rest = (head_dim - first) // 2
    return first, rest, rest


def transformer_problem(heads: int, head_dim: int, blocks: tuple[int, ...]) -> str | None:
    """Why (``--heads``, ``--head-dim``, ``--blocks``) cannot build :func:`build_transformer`, or None."""
    if heads < 1 or head_dim < 16 or head_dim % 16:
        return (f"--heads must be >= 1 and --head-dim a positive multiple of 16 (RoPE splits a head in three "
                f"even parts), got {heads} heads x {head_dim}")
    if len(blocks) != 2 or blocks[0] < 0 or blocks[1] < 0 or sum(blocks) < 1:
        return f"--blocks takes two counts (double-stream, single-stream blocks), at least one block, got {list(blocks)}"
    return None


def build_transformer(text_width: int, tiny: bool = False, heads: int = 4, head_dim: int = 32,
                      blocks: tuple[int, int] = (2, 6)) -> FluxTransformer2DModel:
    """``blocks`` = (double, single) blocks of ``heads`` x ``head_dim`` (hidden size = their product);
    default 2 double + 6 single blocks, 4 heads x 32 (the shipped model). Tiny: 1 + 1 blocks, 2 heads x 16."""
    if tiny:
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=text_width, pooled_projection_dim=text_width,
            guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        )
    if (problem := transformer_problem(heads, head_dim, tuple(blocks))) is not None:
        raise ValueError(problem)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1], attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_width, pooled_projection_dim=text_width,
        guidance_embeds=False, axes_dims_rope=rope_axes(head_dim),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler with the resolution shift anchored at 64 tokens (mu=0.5 at 64x64)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=64, max_image_seq_len=1024,
    )


def make_pipeline(vae, clip, t5, tokenizer, transformer) -> FluxPipeline:
    return FluxPipeline(
        scheduler=build_scheduler(), vae=vae, text_encoder=clip, tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer,
    )


def eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Generation settings of the evaluation (and of the shipped model's ``diffboost.json``)."""
    kw: dict[str, Any] = {"max_sequence_length": TEXT_LEN}
    if args.eval_cfg > 1.0:
        kw.update(true_cfg_scale=args.eval_cfg, negative_prompt="")
    return kw


def model_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """``diffboost.json`` of the shipped pipeline: the settings its adherence was measured with."""
    return {"height": args.size, "width": args.size, "steps": args.eval_steps, **eval_kwargs(args)}


def sampler_shift(num_tokens: int) -> float:
    """The sigma shift the pipeline's scheduler applies at ``num_tokens`` image tokens: exp(mu), mu
    linear in the token count from ``base_shift`` at 64 tokens to ``max_shift`` at 1024 (Flux's rule)."""
    cfg = build_scheduler().config
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return math.exp(cfg.base_shift + slope * (num_tokens - cfg.base_image_seq_len))


def object_token_weights(seeds: list[int], size: int, weight: float) -> torch.Tensor:
    """Per-token loss weights (N, tokens) of the cached scenes at ``size`` px: 1 + ``weight`` x the share
    of the token's 8 x 8 pixels that belong to an object (the VAE's 4x and the 2x2 packing make one
    token 8 x 8 px), so the loss counts object tokens more than flat background."""
    return 1.0 + weight * object_share(seeds, size, 8).flatten(1)  # row-major, the order of _pack_latents


def flow_loss(pred: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor | None) -> torch.Tensor:
    """MSE of the velocity (B, tokens, channels); with ``token_weight`` (B, tokens) a weighted mean over tokens."""
    return weighted_mse(pred, target, token_weight, dim=-1)


def adherence_score(acc: dict[str, float] | None) -> float:
    """Model-selection score: adherence, ties broken by the mean per-attribute accuracy."""
    if not acc:
        return 0.0
    attrs = [v for k, v in acc.items() if k != "all"]
    return acc["all"] + 0.1 * sum(attrs) / len(attrs)


def export(args: argparse.Namespace, vae, tokenizer, emas: dict[str, EMA], step: int, history: list) -> None:
    """Evaluate the checkpoint's EMA weights on ``--eval-prompts`` prompts and save the pipeline."""
    pipe = make_pipeline(vae, emas["clip"].shadow, emas["t5"].shadow, tokenizer, emas["transformer"].shadow)
    pipe.set_progress_bar_config(disable=True)
    export_checkpoint(pipe, args, step, history, eval_kwargs(args), model_defaults(args))


INIT_SUBFOLDERS = {"transformer": FluxTransformer2DModel, "text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}
INIT_MODULES = {"transformer": "transformer", "text_encoder": "clip", "text_encoder_2": "t5"}


def load_init_weights(path: Path, modules: dict[str, torch.nn.Module]) -> int:
    """``--init-from``: the modules (and EMA shadows) of another run's checkpoint, or of a saved
    ``FluxPipeline`` folder (its transformer and text encoders go to both the weights and their EMA);
    optimizer state and step are not used. Returns the step the weights were saved at (-1: unknown)."""
    if path.is_dir():
        for sub, cls in INIT_SUBFOLDERS.items():
            state = cls.from_pretrained(str(path), subfolder=sub).state_dict()
            name = INIT_MODULES[sub]
            for key in (name, f"ema_{name}"):
                modules[key].load_state_dict(state)
        info = path / "training_info.json"
        step = int(json.loads(info.read_text()).get("step", -1)) if info.is_file() else -1
        logger.info("initialised from the pipeline %s (its step %d); starting at step 0 with a fresh optimizer",
                    path, step)
        return step
    meta = load_checkpoint(path, modules, {})
    logger.info("initialised from %s (its step %d); starting at step 0 with a fresh optimizer", path, meta["step"])
    return int(meta["step"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    add_trainer_args(p, out=Path("assets/flux-shapes"), work_dir=Path("runs/flux"), vae_dir=None, lr=5e-4)
    p.add_argument("--long-text-prob", type=float, default=0.1, help="share of steps with T5 padded to 64")
    p.add_argument("--drop-caption", type=float, default=0.0,
                   help="share of samples trained on the empty caption (enables true CFG with negative_prompt='')")
    p.add_argument("--eval-cfg", type=float, default=1.0,
                   help="true_cfg_scale of the evaluation (> 1: CFG against the empty prompt)")
    p.add_argument("--time-shift", type=float, default=None,
                   help="sigma shift of training times (default: the sampler's at each resolution, exp(0.5) at 64 px)")
    p.add_argument("--size", type=int, default=64, help="training and evaluation resolution in px (multiple of 8)")
    p.add_argument("--low-res-prob", type=float, default=0.0,
                   help="with --size > 64: share of steps trained at 64 px, so the model keeps drawing there "
                        "(what bottleneck sampling's low-resolution stage needs)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from another run's checkpoint or a saved FluxPipeline folder "
                        "(weights and EMA; fresh optimizer, step 0)")
    p.add_argument("--uniform-t", type=float, default=0.1, help="share of uniformly drawn training times")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the transformer (default 4)")
    p.add_argument("--head-dim", type=int, default=32,
                   help="width of one head (default 32; a multiple of 16); hidden size = heads x head dim")
    p.add_argument("--blocks", type=int, nargs=2, default=(2, 6), metavar=("DOUBLE", "SINGLE"),
                   help="double-stream and single-stream blocks (default 2 6)")
    args = p.parse_args(argv)
    check_trainer_args(p, args)
    if (problem := transformer_problem(args.heads, args.head_dim, tuple(args.blocks))) is not None:
        p.error(problem)
    if args.tiny and (args.heads, args.head_dim, tuple(args.blocks)) != (4, 32, (2, 6)):
        p.error("--heads/--head-dim/--blocks cannot be combined with --tiny (its transformer is fixed: "
                "1 + 1 blocks, 2 heads x 16)")
    if args.eval_cfg < 1.0:
        p.error(f"--eval-cfg must be >= 1 (1 = no CFG), got {args.eval_cfg}")
    if args.size < 32 or args.size % 8:
        p.error(f"--size must be a multiple of 8 and >= 32 (the VAE halves it twice, packing halves it once), got {args.size}")
    if not 0.0 <= args.low_res_prob < 1.0 or (args.low_res_prob > 0 and args.size <= 64):
        p.error(f"--low-res-prob must be in [0, 1) and needs --size > 64, got {args.low_res_prob} at --size {args.size}")
    if args.time_shift is not None and args.time_shift <= 0:
        p.error(f"--time-shift must be > 0, got {args.time_shift}")
    if args.init_from is not None and not (
        args.init_from.is_file() or (args.init_from / "transformer").is_dir()
    ):
        p.error(f"--init-from: {args.init_from} is neither a checkpoint file nor a FluxPipeline folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.work_dir / "train.log")
    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    device = args.device  # float32 on every device (no TF32), so GPU runs stay close to CPU runs

    vae_dir = args.vae_dir or args.work_dir
    vae_dir.mkdir(parents=True, exist_ok=True)
    vae = train_vae(vae_dir, args.vae_steps, args.vae_batch, lr=args.vae_lr, seed=args.seed, tiny=args.tiny,
                    object_weight=args.vae_object_weight)
    vae.requires_grad_(False).to(device)
    logger.info("VAE reconstruction PSNR %.2f dB", vae_psnr(vae, 32 if args.tiny else 128))
    latents, seeds = cache_latents(vae, vae_dir, args.num_images)
    # normalised with the 64 px statistics at every size, so a 64 px model can be fine-tuned at another
    shift = latents.mean().item()
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    by_size = {64: latents}
    if args.size != 64:
        by_size = {args.size: cache_latents(vae, vae_dir, args.num_images, size=args.size)[0]}
        if args.low_res_prob > 0:
            by_size[64] = latents
    captions = [scenes.random_spec(random.Random(s)).caption for s in seeds]
    draw_weights = scene_draw_weights(captions, args.oversample_small)

    tokenizer = build_tokenizer(TEXT_LEN)
    clip, t5 = build_text_encoders(len(tokenizer), args.text_width, args.tiny)
    transformer = build_transformer(args.text_width, args.tiny, args.heads, args.head_dim, tuple(args.blocks))
    clip, t5, transformer = clip.to(device), t5.to(device), transformer.to(device)
    ids16 = tokenize(tokenizer, captions, TEXT_LEN).to(device)
    ids_long = tokenize(tokenizer, captions, 64).to(device)
    empty16 = tokenize(tokenizer, [""], TEXT_LEN).to(device)
    empty_long = tokenize(tokenizer, [""], 64).to(device)
    packed, img_ids, time_shift = {}, {}, {}
    for px, lat in by_size.items():
        n_lat, c, h, w = lat.shape
        packed[px] = FluxPipeline._pack_latents((lat - shift) * scale, n_lat, c, h, w).to(device)
        img_ids[px] = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
        time_shift[px] = args.time_shift if args.time_shift is not None else sampler_shift(h * w // 4)
    token_w = {}
    if args.object_loss_weight > 0:
        token_w = {px: object_token_weights(seeds, px, args.object_loss_weight).to(device) for px in by_size}
        logger.info("object-weighted loss: mean token weight %s",
                    {px: round(w.mean().item(), 3) for px, w in token_w.items()})
    logger.info("training sizes %s px, time shifts %s", sorted(by_size), {k: round(v, 3) for k, v in time_shift.items()})

    text_params = list(clip.parameters()) + list(t5.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "lr": args.lr},
            {"params": text_params, "lr": args.text_lr},
        ],
        weight_decay=0.0,
        betas=(0.9, 0.99),
    )
    base_lrs = [args.lr, args.text_lr]
    emas = {"transformer": EMA(transformer, args.ema), "clip": EMA(clip, args.ema), "t5": EMA(t5, args.ema)}
    modules = {"transformer": transformer, "clip": clip, "t5": t5, **{f"ema_{k}": e.shadow for k, e in emas.items()}}
    ckpt = args.work_dir / "flux.ckpt"
    start, best, history = 0, -1.0, []
    if ckpt.exists():
        meta = load_checkpoint(ckpt, modules, {"opt": opt})
        start, best, history = meta["step"], meta["best"], meta["history"]
        logger.info("resumed at step %d (best adherence %.3f)", start, best)
    elif args.init_from is not None:
        load_init_weights(args.init_from, modules)
    if args.export:
        export(args, vae, tokenizer, emas, start, history)
        return
    n_params = sum(p.numel() for p in transformer.parameters())
    logger.info("transformer %.2fM params, text %.2fM, %d cached latents", n_params / 1e6,
                sum(p.numel() for p in text_params) / 1e6, args.num_images)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt, modules, {"opt": opt}, {"step": step, "best": best, "history": history})

    timer = Timer(args.ckpt_minutes * 60)
    loss_avg = None
    t_steps = time.monotonic()
    transformer.train(), clip.train(), t5.train()
    bar = tqdm(range(start, args.steps), desc="flux", mininterval=60, initial=start, total=args.steps)
    for step in bar:
        factor = lr_factor(step, 200, args.decay_from, args.decay_to, args.min_lr_ratio)
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * factor
        g = step_generator(args.seed, step)
        px = args.size
        if args.low_res_prob > 0 and torch.rand((), generator=g).item() < args.low_res_prob:
            px = 64
        idx = draw_scenes(draw_weights, args.num_images, args.batch_size, g).to(device)
        x0 = packed[px][idx]
        noise = torch.randn(x0.shape, generator=g).to(device)  # drawn on the CPU: same data on every device
        t = torch.sigmoid(torch.randn(args.batch_size, generator=g))
        t = torch.where(torch.rand(args.batch_size, generator=g) < args.uniform_t, torch.rand(args.batch_size, generator=g), t)
        ts = time_shift[px]
        t = (ts * t / (1 + (ts - 1) * t)).to(device)  # the sampler's shift at this resolution
        long_text = torch.rand((), generator=g).item() < args.long_text_prob
        ids = ids16[idx].clone()
        ids_t5 = ids_long[idx].clone() if long_text else ids
        if args.drop_caption > 0:  # empty captions: the unconditional branch of true CFG
            drop = (torch.rand(args.batch_size, generator=g) < args.drop_caption).to(device)
            ids[drop] = empty16
            if long_text:
                ids_t5[drop] = empty_long
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pooled = clip(ids).pooler_output
        txt = t5(ids_t5).last_hidden_state
        txt_ids = torch.zeros(txt.shape[1], 3, device=device)
        pred = transformer(
            hidden_states=xt, timestep=t, pooled_projections=pooled, encoder_hidden_states=txt,
            txt_ids=txt_ids, img_ids=img_ids[px], return_dict=False,
        )[0]
        loss = flow_loss(pred, noise - x0, token_w[px][idx] if token_w else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(text_params, 1.0)
        opt.step()
        for name, mod in (("transformer", transformer), ("clip", clip), ("t5", t5)):
            emas[name].update(mod, step)
        loss_now = loss.item()
        loss_avg = loss_now if loss_avg is None else 0.98 * loss_avg + 0.02 * loss_now
        done = step + 1
        if done % 50 == 0:
            rate = (time.monotonic() - t_steps) / 50
            t_steps = time.monotonic()
            logger.info("step %d loss %.4f (%.2f s/step)", done, loss_avg, rate)
        last = done == args.steps
        over = args.max_minutes > 0 and time.monotonic() - t_start > args.max_minutes * 60
        if done % args.eval_every == 0 or last or over:
            pipe = make_pipeline(vae, emas["clip"].shadow, emas["t5"].shadow, tokenizer, emas["transformer"].shadow)
            pipe.set_progress_bar_config(disable=True)
            t_eval = time.monotonic()
            res = generate_and_score(pipe, args.eval_prompts, args.eval_steps, seed=args.seed, size=args.size,
                                     **eval_kwargs(args))
            save_grid(res["images"], args.work_dir / f"samples_{done:06d}.png")
            acc = res.get("accuracy")
            score = adherence_score(acc)
            entry = {"step": done, "loss": loss_avg, "accuracy": acc, "minutes": (time.monotonic() - t_start) / 60}
            history.append(entry)
            logger.info("eval step %d (%.0f s): %s", done, time.monotonic() - t_eval, json.dumps(acc))
            if score >= best:
                best = score
                info = {"step": done, "eval_prompts": args.eval_prompts, "eval_steps": args.eval_steps,
                        "accuracy": acc, "loss": loss_avg, "args": {k: str(v) for k, v in vars(args).items()}}
                save_pipeline(pipe, args.out, info, model_defaults(args))
            checkpoint(done)
            timer.last = time.monotonic()
        elif timer.due():
            checkpoint(done)
        if over:
            logger.info("time limit reached at step %d", done)
            break
    logger.info("finished; best adherence %.3f", best)


if __name__ == "__main__":
    main()
