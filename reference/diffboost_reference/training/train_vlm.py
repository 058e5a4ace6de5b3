"""Train the reference vision-language model on procedural visual questions.

``python -m diffboost_reference.training.train_vlm --out assets/llava-shapes`` trains
:mod:`diffboost_reference.training.vlm_model` (vision tower, projector and language model from
scratch, together) on :mod:`diffboost_reference.data.vqa` examples drawn on the fly, and writes a
``LlavaForConditionalGeneration`` folder (safetensors) with its processor, ``accuracy.json`` (held-out
accuracy per question type) and ``train.json`` (the recipe and the measured time) into ``--out``.

The language-model loss covers the answer word and ``</s>``; ``--describe-share`` of the rows ask
"describe ?" and are answered with every object (LLaVA's captioning stage: many supervised tokens per
image). Two losses on the vision tower stand in for CLIP's pre-training: its CLS output names which
shapes and colours the scene holds (so that methods reading CLS attention find a meaningful one), and
every patch of the feature layer names the shape and colour under it (the patches inside an object
once more with the shape alone: most patches are background). The first ``--tower-steps`` steps train
the vision tower alone on those two losses (cheap: no language model; CLIP's pre-training before
LLaVA's), the next ``--steps`` the whole model. ``--init`` starts a second stage from another run's
checkpoint. benchmarks/TRAINING.md ("Reference VLM") has the shipped recipe.

Resumable: the run checkpoints into ``--work`` every ``--save-every`` steps; rerunning the same
command continues from the last checkpoint (examples, and the learning rate, are a function of the
step number only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffboost_reference.data import scenes, vqa
from diffboost_reference.evaluation import vqa as vqa_eval
from diffboost_reference.training import vlm_model
from diffboost_reference.training.common import load_checkpoint, lr_factor, save_checkpoint, setup_logging

logger = logging.getLogger(__name__)


def presence_targets(examples: list[vqa.Example]) -> torch.Tensor:
    """Multi-hot (shapes present, colours present) per example."""
    colors = tuple(scenes.COLORS)
    t = torch.zeros(len(examples), len(scenes.SHAPES) + len(colors))
    for i, e in enumerate(examples):
        for o in e.objects:
            t[i, scenes.SHAPES.index(o.shape)] = 1
            t[i, len(scenes.SHAPES) + colors.index(o.color)] = 1
    return t


def patch_targets(examples: list[vqa.Example], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch of a ``grid x grid`` split: the shape (0 = none, 1.. = SHAPES) and colour (0 = none,
    1.. = COLORS) of the object whose disc covers the patch centre (positions before jitter)."""
    colors = tuple(scenes.COLORS)
    cell = vqa.IMAGE_SIZE / grid
    centres = (torch.arange(grid) + 0.5) * cell
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    shape_t = torch.zeros(len(examples), grid * grid, dtype=torch.long)
    color_t = torch.zeros_like(shape_t)
    for i, e in enumerate(examples):
        for o in e.objects:
            cx, cy = vqa.CELLS[o.cell]
            inside = ((xs - cx) ** 2 + (ys - cy) ** 2 <= (vqa.RADIUS * 0.8) ** 2).flatten()
            shape_t[i, inside] = 1 + scenes.SHAPES.index(o.shape)
            color_t[i, inside] = 1 + colors.index(o.color)
    return shape_t, color_t


@torch.no_grad()
def patch_shape_accuracy(model, dense, processor, examples: list[vqa.Example], pooled: dict, grid: int) -> float:
    """Share of the patches inside held-out objects whose feature the per-patch head names the right
    shape from (the vision tower's own progress; the hooks fill ``pooled``)."""
    pixels = processor.image_processor([e.pil() for e in examples], return_tensors="pt")["pixel_values"]
    model.model.vision_tower(pixel_values=pixels.to(dense.weight.device))
    shape_t, _ = patch_targets(examples, grid)
    predicted = dense(pooled["patches"])[..., : 1 + len(scenes.SHAPES)].argmax(-1).cpu()
    inside = shape_t > 0
    return float((predicted[inside] == shape_t[inside]).float().mean())


def train_batch(processor, step: int, batch_size: int, describe_share: float = 0.0
                ) -> tuple[dict[str, torch.Tensor], list[vqa.Example]]:
    """The examples of ``step``: prompt + answer + ``</s>``, labels on the answer and ``</s>``. A
    ``describe_share`` of them (the first ones) ask ``"describe ?"`` instead and are answered with
    the scene's objects (:func:`vqa.describe`): many supervised tokens per image, as LLaVA's
    captioning stage."""
    base = vqa.TRAIN_SEED_BASE + step * batch_size
    examples = [vqa.make_example(base + i) for i in range(batch_size)]
    n_describe = round(describe_share * batch_size)
    pairs = [(vqa.DESCRIBE, vqa.describe(e)) if i < n_describe else (e.question, e.answer)
             for i, e in enumerate(examples)]
    enc = processor(
        images=[e.pil() for e in examples],
        text=[f"{vlm_model.prompt(q)} {a} {vlm_model.EOS}" for q, a in pairs],
        return_tensors="pt", padding=True,
    )
    labels = torch.full_like(enc["input_ids"], -100)
    for i, (_, answer) in enumerate(pairs):  # left padding: every row ends with its answer, </s>
        n = len(answer.split()) + 1
        labels[i, -n:] = enc["input_ids"][i, -n:]
    enc["labels"] = labels
    return dict(enc), examples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("assets/llava-shapes"))
    p.add_argument("--work", type=Path, default=Path("runs/llava-shapes"))
    p.add_argument("--steps", type=int, default=3000, help="steps of the whole model (after the tower's)")
    p.add_argument("--tower-steps", type=int, default=4000,
                   help="steps that train the vision tower alone first (0 = none; default %(default)s)")
    p.add_argument("--tower-lr", type=float, default=2e-3, help="peak learning rate of the tower steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--aux-weight", type=float, default=0.3, help="weight of the CLS presence loss")
    p.add_argument("--dense-weight", type=float, default=0.3,
                   help="weight of the per-patch loss (each visual feature names the shape and colour under it)")
    p.add_argument("--describe-share", type=float, default=0.5,
                   help="share of each batch asked to describe the scene instead of a question (training only)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from the model weights of another run's checkpoint.safetensors (a second stage)")
    p.add_argument("--vision-layers", type=int, default=vlm_model.VISION["num_hidden_layers"],
                   help="vision tower depth (default %(default)s)")
    p.add_argument("--vision-width", type=int, default=vlm_model.VISION["hidden_size"],
                   help="vision tower width (default %(default)s; 4 heads, MLP 4x)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--final-examples", type=int, default=1024)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (checkpointed) after this long; 0 = no limit")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tower_steps < 0:
        p.error("--tower-steps must be >= 0")
    for name in ("steps", "batch_size", "save_every", "eval_every", "eval_examples", "final_examples",
                 "vision_layers", "vision_width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lr", "tower_lr"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name.replace('_', '-')} must be a positive number")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    setup_logging(args.work / "train.log")
    device = torch.device(args.device)
    started = time.monotonic()

    processor = vlm_model.build_processor()
    if args.vision_layers < 2 or args.vision_width % 4:
        p.error("--vision-layers must be >= 2 (features come from layer -2) and --vision-width a multiple of 4")
    vision = dict(vlm_model.VISION, num_hidden_layers=args.vision_layers, hidden_size=args.vision_width,
                  intermediate_size=4 * args.vision_width)
    model = vlm_model.build_model(len(processor.tokenizer), vision=vision, seed=args.seed).to(device)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(scenes.SHAPES) + len(scenes.COLORS)).to(device)
    width = model.config.vision_config.hidden_size
    dense = torch.nn.Linear(width, 1 + len(scenes.SHAPES) + 1 + len(scenes.COLORS)).to(device)
    params = list(model.parameters()) + list(head.parameters()) + list(dense.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    ckpt = args.work / "checkpoint.safetensors"
    step, seconds, history = 0, 0.0, []
    if ckpt.exists():
        meta = load_checkpoint(ckpt, {"model": model, "head": head, "dense": dense}, {"opt": opt})
        step, seconds, history = meta["step"], meta["seconds"], meta["history"]
        logger.info("resumed at step %d (%.1f min trained)", step, seconds / 60)
    elif args.init is not None:
        from safetensors.torch import load_file

        if not args.init.is_file():
            p.error(f"--init {args.init}: no such checkpoint file")
        tensors = load_file(str(args.init))
        for name, module in (("model", model), ("head", head), ("dense", dense)):
            prefix = f"module.{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        logger.info("initialised from %s", args.init)

    pooled: dict[str, torch.Tensor] = {}
    hook = model.model.vision_tower.register_forward_hook(lambda m, a, out: pooled.__setitem__("cls", out.pooler_output))
    tower = model.model.vision_tower
    feature_block = getattr(tower, "vision_model", tower).encoder.layers[model.config.vision_feature_layer]
    hook2 = feature_block.register_forward_hook(
        lambda m, a, out: pooled.__setitem__("patches", (out[0] if isinstance(out, tuple) else out)[:, 1:]))
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size

    def save() -> None:
        save_checkpoint(ckpt, {"model": model, "head": head, "dense": dense}, {"opt": opt},
                        {"step": step, "seconds": seconds, "history": history, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})

    held = vqa.held_out(args.eval_examples)
    total = args.tower_steps + args.steps
    t0 = time.monotonic()
    model.train()
    while step < total:
        tower_only = step < args.tower_steps
        for g in opt.param_groups:
            g["lr"] = (args.tower_lr * lr_factor(step, args.warmup, args.warmup, args.tower_steps) if tower_only else
                       args.lr * lr_factor(step - args.tower_steps, args.warmup, args.warmup, args.steps))
        if tower_only:  # the hooks collect CLS and the feature layer; the language model does not run
            examples = [vqa.make_example(vqa.TRAIN_SEED_BASE + step * args.batch_size + i) for i in range(args.batch_size)]
            pixels = processor.image_processor([e.pil() for e in examples], return_tensors="pt")["pixel_values"]
            tower(pixel_values=pixels.to(device))
            answer_loss = torch.zeros((), device=device)
        else:
            batch, examples = train_batch(processor, step, args.batch_size, args.describe_share)
            batch = {k: v.to(device) for k, v in batch.items()}
            answer_loss = model(**batch).loss
        aux = F.binary_cross_entropy_with_logits(head(pooled["cls"]), presence_targets(examples).to(device))
        shape_t, color_t = patch_targets(examples, grid)
        shape_t, color_t = shape_t.to(device), color_t.to(device)
        logits = dense(pooled["patches"])
        n_shape = 1 + len(scenes.SHAPES)
        inside = shape_t > 0
        dense_loss = F.cross_entropy(logits[..., :n_shape].flatten(0, 1), shape_t.flatten()) + \
            F.cross_entropy(logits[..., n_shape:].flatten(0, 1), color_t.flatten()) + \
            (F.cross_entropy(logits[..., :n_shape][inside], shape_t[inside]) if inside.any() else 0.0)
        loss = answer_loss + args.aux_weight * aux + (1.0 if tower_only else args.dense_weight) * dense_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.monotonic()
        seconds += now - t0
        t0 = now
        if step % 50 == 0:
            history.append([step, round(answer_loss.item(), 5), round(aux.item(), 5), round(dense_loss.item(), 5)])
            logger.info("step %d%s answer loss %.4f presence loss %.4f patch loss %.4f (%.2f s/step)", step,
                        " (tower)" if tower_only else "", answer_loss.item(), aux.item(), dense_loss.item(),
                        seconds / step if step else 0)
        if step == args.tower_steps and args.tower_steps:
            model.eval()
            logger.info("step %d tower: patch shape accuracy %.3f (held-out objects' inner patches)", step,
                        patch_shape_accuracy(model, dense, processor, held, pooled, grid))
            model.train()
            t0 = time.monotonic()
        if step > args.tower_steps and (step - args.tower_steps) % args.eval_every == 0 or step == total:
            model.eval()
            acc = vqa_eval.accuracy(vqa_eval.answers(model, processor, held), held)
            model.train()
            history.append([step, "eval", acc])
            logger.info("step %d held-out accuracy %s", step, {k: round(v, 3) for k, v in acc.items()})
            t0 = time.monotonic()
        if step % args.save_every == 0 or step == total:
            save()
            t0 = time.monotonic()
        if args.max_minutes and (time.monotonic() - started) / 60 >= args.max_minutes and step < total:
            save()
            logger.info("stopped after %.1f minutes at step %d; rerun the same command to continue", args.max_minutes, step)
            return
    hook.remove()
    hook2.remove()

    model.eval()
    final = vqa.held_out(args.final_examples)
    acc = vqa_eval.accuracy(vqa_eval.answers(model, processor, final), final)
    logger.info("final held-out accuracy over %d questions: %s", len(final), acc)
    tmp = args.out.with_name(args.out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.cpu().save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "accuracy.json").write_text(json.dumps({"held_out_examples": len(final), "accuracy": acc}, indent=2) + "\n")
    (tmp / "train.json").write_text(json.dumps({
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": step, "train_minutes": round(seconds / 60, 1), "threads": torch.get_num_threads(),
        "device": str(device), "history": history,
    }, indent=1) + "\n")
    for f in tmp.iterdir():  # save_pretrained leaves some files owner-only
        f.chmod(0o644)
    if args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
