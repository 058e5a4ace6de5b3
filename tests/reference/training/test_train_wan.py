"""The reference video trainer: every stage runs, resumes, and the saved WanPipeline loads offline."""

import json
from pathlib import Path

import pytest

from diffboost_reference.training import train_wan


def _args(tmp: Path, steps: int, **extra: str) -> list[str]:
    args = {"--out": str(tmp / "out"), "--work-dir": str(tmp / "work"), "--vae-steps": "2", "--vae-batch": "2",
            "--num-clips": "8", "--steps": str(steps), "--batch-size": "2", "--eval-every": "3",
            "--eval-prompts": "2", "--eval-steps": "2", "--threads": "1", **extra}
    return ["--tiny", *[x for kv in args.items() for x in kv]]


def test_stages_resume_and_the_pipeline_loads(tmp_path):
    import torch
    from diffusers import WanPipeline

    train_wan.main(_args(tmp_path, 2))  # VAE, latents, 2 denoiser steps, evaluated at the last one
    assert (tmp_path / "work" / "vae" / "config.json").is_file() and (tmp_path / "out").is_dir()
    train_wan.main(_args(tmp_path, 3))  # the same command, one more step: resumes, evaluates, saves
    log = (tmp_path / "work" / "train.log").read_text()
    assert "resumed at step 2" in log and "eval step 3" in log
    info = json.loads((tmp_path / "out" / "training_info.json").read_text())
    assert info["step"] == 3 and set(info["accuracy"]) >= {"shape", "color", "motion", "all", "consistency"}
    defaults = json.loads((tmp_path / "out" / "diffboost.json").read_text())
    assert defaults["num_frames"] == 9 and defaults["height"] == 64
    pipe = WanPipeline.from_pretrained(str(tmp_path / "out"), use_safetensors=True, local_files_only=True)
    assert pipe.vae.config.latents_std != [1.0] * pipe.vae.config.z_dim  # the cached latents' statistics
    out = pipe("a red circle growing on a white background", num_frames=9, height=64, width=64,
               num_inference_steps=2, output_type="np", max_sequence_length=16,
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 9, 64, 64, 3)


def test_bad_settings_are_refused():
    for bad in (["--steps", "0"], ["--drop-caption", "1"], ["--eval-cfg", "0.5"], ["--shift", "-1"],
                ["--head-dim", "30"]):
        with pytest.raises(SystemExit):
            train_wan.parse_args(bad)
