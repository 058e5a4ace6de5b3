"""A few steps of each trainer on tiny configs: runs, resumes from its checkpoint, saves loadable output."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from diffboost_reference.training import train_evaluator, train_flux, train_sd
from diffboost_reference.training.common import build_tokenizer


def _ckpt_step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["meta"])["step"]


COMMON = ["--vae-steps", "2", "--vae-batch", "2", "--num-images", "16", "--batch-size", "2",
          "--eval-prompts", "2", "--eval-steps", "2", "--tiny"]


def test_tokenizer_appends_eos_and_pads() -> None:
    tok = build_tokenizer(16)
    ids = tok(["a large red circle"], padding="max_length", max_length=16).input_ids[0]
    assert ids[4] == 1 and ids[5:] == [0] * 11 and 2 not in ids  # </s>, pads, no <unk>


def test_flux_trainer_resumes_and_saves(tmp_path: Path) -> None:
    import torch
    from diffusers import FluxPipeline

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--out", str(out), "--work-dir", str(work), *COMMON, "--eval-every", "2"]
    train_flux.main([*args, "--steps", "2"])
    assert _ckpt_step(work / "flux.ckpt") == 2
    train_flux.main([*args, "--steps", "3"])
    assert _ckpt_step(work / "flux.ckpt") == 3
    assert (work / "train.log").read_text().count("resumed at step 2") == 1
    # resumed with empty captions in training and true CFG in the evaluation
    train_flux.main([*args, "--steps", "3", "--export", "--drop-caption", "0.5", "--eval-cfg", "3"])
    assert json.loads((out / "training_info.json").read_text())["step"] == 3
    shipped = json.loads((out / "diffboost.json").read_text())
    assert shipped["true_cfg_scale"] == 3.0 and shipped["negative_prompt"] == "" and shipped["height"] == 64
    pipe = FluxPipeline.from_pretrained(str(out))
    img = pipe("a large red circle at the left on a white background", height=64, width=64,
               num_inference_steps=2, max_sequence_length=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert not pipe.transformer.config.guidance_embeds


def _fresh_flux_modules() -> dict:
    tok = build_tokenizer(train_flux.TEXT_LEN)
    clip, t5 = train_flux.build_text_encoders(len(tok), 64, tiny=True)
    transformer = train_flux.build_transformer(64, tiny=True)
    fresh = {"transformer": transformer, "clip": clip, "t5": t5}
    return {**fresh, **{f"ema_{k}": train_flux.build_transformer(64, tiny=True) if k == "transformer"
                        else train_flux.build_text_encoders(len(tok), 64, tiny=True)[k == "t5"] for k in fresh}}


def test_flux_trainer_fine_tunes_at_a_larger_size_from_another_run(tmp_path: Path) -> None:
    import torch
    from diffusers import FluxPipeline

    from diffboost_reference.training.train_flux import sampler_shift

    work64, work128, out = tmp_path / "w64", tmp_path / "w128", tmp_path / "out"
    # the first run also trains its VAE with the object-weighted loss (L1 + MSE + object-pixel L1)
    train_flux.main(["--out", str(tmp_path / "o64"), "--work-dir", str(work64), *COMMON, "--steps", "2",
                     "--vae-object-weight", "1"])
    assert json.loads((work64 / "vae_meta.json").read_text())["steps"] == 2
    args = ["--out", str(out), "--work-dir", str(work128), "--vae-dir", str(work64), *COMMON,
            "--size", "128", "--low-res-prob", "0.5", "--init-from", str(work64 / "flux.ckpt"), "--eval-every", "2"]
    train_flux.main([*args, "--steps", "2"])
    log = (work128 / "train.log").read_text()
    assert "initialised from" in log and "training sizes [64, 128] px" in log
    assert (work64 / "latents_16_px128.safetensors").is_file()  # the 128 px cache sits next to the 64 px one
    assert _ckpt_step(work128 / "flux.ckpt") == 2
    assert json.loads((out / "diffboost.json").read_text())["height"] == 128
    img = FluxPipeline.from_pretrained(str(out))(
        "a large red circle at the left on a white background", height=128, width=128, num_inference_steps=2,
        max_sequence_length=16, output_type="np").images
    assert img.shape == (1, 128, 128, 3) and np.isfinite(img).all()
    # a saved pipeline folder works as --init-from too: its weights go to the model and its EMA
    modules = _fresh_flux_modules()
    assert train_flux.load_init_weights(out, modules) == 2
    shipped = FluxPipeline.from_pretrained(str(out))
    for name, mod in (("transformer", shipped.transformer), ("clip", shipped.text_encoder), ("t5", shipped.text_encoder_2)):
        want = mod.state_dict()
        for key in (name, f"ema_{name}"):
            got = modules[key].state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the training times follow the sampler's resolution shift: exp(0.5) at 64 tokens, more at 256
    assert abs(sampler_shift(64) - np.exp(0.5)) < 1e-9 and sampler_shift(256) > sampler_shift(64)


def test_flux_trainer_refuses_cuda_without_a_gpu(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        train_flux.parse_args(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
@pytest.mark.parametrize("trainer, ckpt", [(train_flux, "flux.ckpt"), (train_sd, "sd.ckpt")], ids=["flux", "sd"])
def test_trainer_on_cuda_matches_the_cpu_run(trainer, ckpt: str, tmp_path: Path) -> None:
    """Same seeded data on both devices: the CUDA run ends near the CPU run (not bit-identical)."""
    from safetensors.torch import load_file

    runs = {}
    for device in ("cpu", "cuda"):
        work = tmp_path / device
        trainer.main(["--out", str(tmp_path / f"o-{device}"), "--work-dir", str(work), "--vae-dir",
                      str(tmp_path / "vae"), *COMMON, "--steps", "3", "--eval-every", "3", "--device", device])
        runs[device] = load_file(str(work / ckpt))
    assert runs["cpu"].keys() == runs["cuda"].keys()
    for key, value in runs["cpu"].items():
        if key.startswith("module.") and value.is_floating_point():
            # float32 on both (no TF32): far closer than runs on different data (~5% of the norm here)
            gap = (value - runs["cuda"][key]).norm()
            assert gap <= 1e-3 * value.norm() + 1e-5, (key, gap.item(), value.norm().item())


def test_sd_trainer_resumes_and_saves(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--out", str(out), "--work-dir", str(work), "--vae-dir", str(work), *COMMON, "--eval-every", "2"]
    train_sd.main([*args, "--steps", "2"])
    train_sd.main([*args, "--steps", "3"])
    assert _ckpt_step(work / "sd.ckpt") == 3
    assert json.loads((out / "diffboost.json").read_text())["guidance_scale"] == 3.0
    train_sd.main([*args, "--steps", "3", "--export", "--guidance", "4"])
    assert json.loads((out / "training_info.json").read_text())["step"] == 3
    assert json.loads((out / "diffboost.json").read_text())["guidance_scale"] == 4.0
    assert (work / "export_000003.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    img = pipe("a small blue star at the top on a black background", height=64, width=64,
               num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_evaluator_trainer(tmp_path: Path) -> None:
    from diffboost_reference.evaluation.classifier import load_evaluator

    out = tmp_path / "ev"
    train_evaluator.main(["--out", str(out), "--steps", "3", "--batch-size", "8", "--heldout", "16", "--tiny"])
    report = json.loads((out / "accuracy.json").read_text())
    assert set(report["clean"]) >= {"shape", "color", "size", "position", "background"}
    ev = load_evaluator(out)
    assert len(ev.predict(np.zeros((2, 64, 64, 3), np.uint8))) == 2


def test_decoder_finetune_keeps_the_encoder(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from diffboost_reference.training.vae import build_vae, finetune_decoder

    with pytest.raises(FileNotFoundError, match="no finished VAE"):
        finetune_decoder(tmp_path, 2)
    torch.manual_seed(0)
    vae = build_vae()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "vae_meta.json").write_text(json.dumps({"steps": 1}))
    before = load_file(str(tmp_path / "vae.safetensors"))
    finetune_decoder(tmp_path, 2, batch_size=2)
    after = load_file(str(tmp_path / "vae.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    meta = json.loads((tmp_path / "vae_meta.json").read_text())
    assert meta == {"steps": 1, "decoder_steps": 2, "decoder_object_weight": {"2": 0.0}}
    finetune_decoder(tmp_path, 3, batch_size=2, object_weight=4.0)  # resumes at 2, one more step
    meta = json.loads((tmp_path / "vae_meta.json").read_text())
    assert meta["decoder_steps"] == 3 and meta["decoder_object_weight"] == {"2": 0.0, "3": 4.0}


def test_vae_finetune_moves_the_encoder_and_versions_the_latent_cache(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from diffboost_reference.training.vae import build_vae, cache_latents, encoder_version, finetune_vae

    torch.manual_seed(0)
    vae = build_vae()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "vae_meta.json").write_text(json.dumps({"steps": 1}))
    before = load_file(str(tmp_path / "vae.safetensors"))
    old_latents, _ = cache_latents(vae.eval(), tmp_path, 4, batch_size=4)
    assert (tmp_path / "latents_4.safetensors").is_file() and encoder_version(tmp_path) == 0
    tuned = finetune_vae(tmp_path, 2, batch_size=2)
    after = load_file(str(tmp_path / "vae.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert all(torch.equal(before[k], v) for k, v in load_file(str(tmp_path / "vae.e0.safetensors")).items())
    assert encoder_version(tmp_path) == 1
    new_latents, _ = cache_latents(tuned, tmp_path, 4, batch_size=4)
    assert (tmp_path / "latents_4_e1.safetensors").is_file()  # a new cache, the old one untouched
    assert not torch.equal(new_latents, old_latents)
    assert torch.equal(cache_latents(vae, tmp_path, 4)[0], new_latents)  # read back from the e1 file


def test_object_mask_marks_objects_not_background() -> None:
    import torch

    from diffboost_reference.training.common import object_mask, scene_batch

    x, _ = scene_batch([5, 6])
    mask = object_mask(x)
    assert mask.shape == (2, 1, 64, 64)
    share = mask.mean(dim=(1, 2, 3))
    assert ((share > 0.01) & (share < 0.3)).all(), share  # objects are a few percent of a scene
    assert object_mask(torch.full_like(x[:1], 0.2)).sum() == 0  # a plain image has no objects


def test_lr_factor_warmup_then_cosine() -> None:
    from diffboost_reference.training.common import lr_factor

    assert lr_factor(0, 200) == 1 / 200 and lr_factor(199, 200) == 1.0
    assert lr_factor(5000, 200) == 1.0  # no decay configured
    f = [lr_factor(s, 200, 1000, 2000, 0.1) for s in (999, 1000, 1500, 2000, 9000)]
    assert f[0] == f[1] == 1.0 and abs(f[2] - 0.55) < 1e-9 and abs(f[3] - 0.1) < 1e-9 and abs(f[4] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(f, f[1:]))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--decay-from", "10", "--decay-to", "5"], "--decay-to"),
        (["--min-lr-ratio", "0"], "--min-lr-ratio"),
        (["--prediction", "epsilon"], "--zero-snr"),
        (["--channels", "32"], "--channels"),
        (["--channels", "32", "40"], "--channels"),
        (["--oversample-small", "0.5"], "--oversample-small must be >= 1"),
        (["--time-conditioning", "film"], "--time-conditioning"),
    ],
)
def test_sd_trainer_rejects_bad_arguments(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit):
        train_sd.parse_args(argv)
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--size", "60"], "--size must be a multiple of 8"),
        (["--size", "24"], "--size must be a multiple of 8"),
        (["--low-res-prob", "0.3"], "needs --size > 64"),
        (["--size", "128", "--low-res-prob", "1"], "--low-res-prob must be in [0, 1)"),
        (["--init-from", "no/such.ckpt"], "neither a checkpoint file nor a FluxPipeline folder"),
        (["--device", "tpu"], "--device"),
        (["--device", "nonsense"], "--device: unknown device"),
        (["--vae-object-weight", "-1"], "--vae-object-weight must be >= 0"),
        (["--eval-cfg", "0.5"], "--eval-cfg must be >= 1"),
        (["--time-shift", "0"], "--time-shift must be > 0"),
        (["--object-loss-weight", "-1"], "--object-loss-weight must be >= 0"),
        (["--oversample-small", "0.5"], "--oversample-small must be >= 1"),
        (["--head-dim", "40"], "a positive multiple of 16"),
        (["--heads", "0"], "--heads must be >= 1"),
        (["--blocks", "0", "0"], "at least one block"),
        (["--blocks", "2", "-1"], "--blocks takes two counts"),
        (["--tiny", "--heads", "8"], "cannot be combined with --tiny"),
    ],
)
def test_flux_trainer_rejects_bad_arguments(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit):
        train_flux.parse_args(argv)
    assert needle in capsys.readouterr().err


def test_sd_scheduler_has_zero_terminal_snr() -> None:
    sched = train_sd.build_scheduler("v_prediction", zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) < 1e-6 and sched.config.timestep_spacing == "trailing"
    sched.set_timesteps(28)
    assert int(sched.timesteps[0]) == 999  # sampling starts from pure noise
    plain = train_sd.build_scheduler("epsilon", zero_snr=False)
    assert float(plain.alphas_cumprod[-1]) > 1e-3


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "exactly one of"),
        (["--decoder-steps", "5", "--encoder-steps", "5"], "exactly one of"),
        (["--encoder-steps", "5", "--anchor-weight", "-1"], "--anchor-weight must be >= 0"),
        (["--decoder-steps", "5", "--lr", "0"], "--lr must be > 0"),
        (["--decoder-steps", "5", "--anchor-weight", "0.2"], "--anchor-weight applies to --encoder-steps only"),
    ],
)
def test_vae_cli_rejects_bad_arguments(argv, message, capsys, tmp_path: Path) -> None:
    from diffboost_reference.training.vae import main

    with pytest.raises(SystemExit):
        main(["--work-dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_object_token_weights_mark_object_tokens_and_weight_the_loss(tmp_path: Path) -> None:
    import torch

    from diffboost_reference.data import scenes
    from diffboost_reference.training.vae import LATENT_SEED_OFFSET

    seeds = [LATENT_SEED_OFFSET + i for i in range(4)]
    w = train_flux.object_token_weights(seeds, 64, 3.0)
    assert w.shape == (4, 64) and w.min() == 1.0 and w.max() <= 4.0
    # every scene has an object: some tokens weigh more, and most of the (flat) background weighs 1
    assert ((w > 1).sum(1) > 0).all() and ((w == 1).float().mean(1) > 0.5).all()
    # the heaviest token sits where the object is drawn (row-major token grid of 8 x 8 px cells)
    images, _ = scenes.make_batch(seeds, size=64)
    for img, row in zip(images, w):
        r, c = divmod(int(row.argmax()), 8)
        cell = img[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].reshape(-1, 3).astype(int)
        assert (abs(cell - np.median(img.reshape(-1, 3), axis=0)).sum(1) > 38).any()
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[:, 0] = 3.0  # the heavy token has the larger error
    tw = torch.tensor([[5.0, 1.0, 1.0], [5.0, 1.0, 1.0]])
    assert train_flux.flow_loss(pred, target, tw).item() == pytest.approx((5 * 9 + 2) / 7)
    assert train_flux.flow_loss(pred, target, None).item() == pytest.approx(11 / 3)
    work = tmp_path / "w"
    train_flux.main(["--out", str(tmp_path / "o"), "--work-dir", str(work), *COMMON, "--steps", "2",
                     "--object-loss-weight", "2"])
    assert "object-weighted loss" in (work / "train.log").read_text()


def test_object_weighted_loss_of_the_sd_trainer(tmp_path: Path) -> None:
    import torch

    from diffboost_reference.training.common import object_share, weighted_mse
    from diffboost_reference.training.vae import LATENT_SEED_OFFSET

    seeds = [LATENT_SEED_OFFSET + i for i in range(3)]
    share = object_share(seeds, 64, 4)  # the SD latent grid: one value per 4 x 4 px cell
    assert share.shape == (3, 1, 16, 16) and 0 <= share.min() and share.max() <= 1
    # pooling the 8 x 8 cells of the Flux tokens from the 4 x 4 ones gives the same shares
    assert torch.allclose(torch.nn.functional.avg_pool2d(share, 2), object_share(seeds, 64, 8))
    pred, target = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    target[0, :, 0, 0] = 2.0  # error 4 at the first latent pixel (all channels), 0 at the second
    assert weighted_mse(pred, target, torch.tensor([[[3.0, 1.0]]]), dim=1).item() == pytest.approx(3 * 4 / 4)
    assert weighted_mse(pred, target, None, dim=1).item() == pytest.approx(2.0)
    work = tmp_path / "w"
    train_sd.main(["--out", str(tmp_path / "o"), "--work-dir", str(work), "--vae-dir", str(work), *COMMON,
                   "--steps", "2", "--object-loss-weight", "2"])
    assert "object-weighted loss" in (work / "train.log").read_text()


def test_sd_trainer_oversamples_small_objects_and_takes_adagn(tmp_path: Path) -> None:
    import torch

    from diffboost_reference.training.common import draw_scenes, scene_draw_weights
    from diffboost_reference.training.train_sd import build_unet

    captions = ["a small red circle at the left on a white background",
                "a large red circle at the left on a white background"]
    assert scene_draw_weights(captions, 1.0) is None  # uniform: the draw of earlier runs
    w = scene_draw_weights(captions, 3.0)
    assert w.tolist() == [3.0, 1.0]
    g = torch.Generator().manual_seed(0)
    idx = draw_scenes(w, 2, 4000, g)
    assert abs((idx == 0).float().mean().item() - 0.75) < 0.03
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(draw_scenes(None, 16, 8, g1), torch.randint(0, 16, (8,), generator=g2))
    unet = build_unet(64, tiny=True, time_conditioning="scale_shift")
    assert unet.config.resnet_time_scale_shift == "scale_shift"
    work = tmp_path / "w"
    train_sd.main(["--out", str(tmp_path / "o"), "--work-dir", str(work), "--vae-dir", str(work), *COMMON,
                   "--steps", "2", "--oversample-small", "2", "--time-conditioning", "scale_shift"])
    log = (work / "train.log").read_text()
    assert "drawn 2.0x as often" in log
    from diffusers import UNet2DConditionModel
    assert UNet2DConditionModel.from_pretrained(str(tmp_path / "o" / "unet")).config.resnet_time_scale_shift == "scale_shift"


def test_generate_and_score_takes_the_prompt_seed() -> None:
    import numpy as np

    from diffboost_reference.data import scenes
    from diffboost_reference.training.evaluate import generate_and_score

    class Recorder:
        """Stands in for a pipeline: records the prompts, returns grey images."""

        def __init__(self) -> None:
            self.prompts: list[str] = []

        def __call__(self, prompts, height, width, **_):
            self.prompts += prompts
            return type("Out", (), {"images": np.full((len(prompts), height, width, 3), 0.5)})()

    pipes = {s: Recorder() for s in (1, 2)}
    for s, pipe in pipes.items():
        generate_and_score(pipe, 8, 2, prompt_seed=s)
    assert pipes[1].prompts == scenes.benchmark_prompts(8, seed=1)
    assert pipes[2].prompts == scenes.benchmark_prompts(8, seed=2) != pipes[1].prompts


def test_flux_transformer_width_and_depth_options(tmp_path: Path) -> None:
    """``--heads/--head-dim/--blocks`` build the transformer they name (RoPE split in even parts), and
    ``--oversample-small`` reaches the Flux trainer's data draw."""
    assert train_flux.rope_axes(32) == (8, 12, 12)  # the shipped model's split
    for head_dim in (16, 48, 64):
        assert sum(train_flux.rope_axes(head_dim)) == head_dim and all(a % 2 == 0 for a in train_flux.rope_axes(head_dim))
    default = train_flux.build_transformer(64)
    assert (default.config.num_layers, default.config.num_single_layers) == (2, 6)
    assert default.config.num_attention_heads * default.config.attention_head_dim == 128
    wide = train_flux.build_transformer(64, heads=2, head_dim=48, blocks=(1, 2))
    assert (wide.config.num_layers, wide.config.num_single_layers, wide.inner_dim) == (1, 2, 96)
    assert tuple(wide.config.axes_dims_rope) == (12, 18, 18)
    with pytest.raises(ValueError, match="multiple of 16"):
        train_flux.build_transformer(64, head_dim=24)
    work = tmp_path / "w"
    train_flux.main(["--out", str(tmp_path / "o"), "--work-dir", str(work), *COMMON, "--steps", "2",
                     "--oversample-small", "2"])
    assert "drawn 2.0x as often" in (work / "train.log").read_text()
