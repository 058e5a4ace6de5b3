"""diffboost distill on a tiny Flux teacher: the folder it writes, resume after an interruption
(bit-identical to an uninterrupted run), the pairs' reuse, the loss going down, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffboost.distill import DistillConfig, UnsupportedTeacherError, distill, teacher_for
from diffboost.distill import trainer as trainer_mod
from factories import TEACHER_SETTINGS, distill_tiny, interrupt_at_call, make_sd, save_flux_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_flux_teacher(tmp_path_factory.mktemp("teacher") / "flux")


def test_the_student_folder_loads_with_the_pipeline_class_and_generates_in_one_step(teacher, tmp_path):
    from diffusers import FluxPipeline

    info = distill_tiny(teacher, tmp_path / "student")
    out = tmp_path / "student"
    pipe = FluxPipeline.from_pretrained(str(out), local_files_only=True, use_safetensors=True)
    cfg = pipe.scheduler.config
    assert not cfg.use_dynamic_shifting and cfg.shift == 1.0
    settings = json.loads((out / "diffboost.json").read_text())
    assert settings["steps"] == 1 and "true_cfg_scale" not in settings and settings["height"] == 32
    record = json.loads((out / "distill.json").read_text())
    assert record["method"] == "reflow" and record["step"] == 6 and record["student_steps"] == [1, 2, 3, 4]
    assert record["guidance"] == {"true_cfg_scale": TEACHER_SETTINGS["true_cfg_scale"]} and info["step"] == 6
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = pipe("a red circle", num_inference_steps=1, height=32, width=32, max_sequence_length=8,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    # the student is trained: its weights moved away from the teacher's
    student = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    original = load_file(str(next((teacher / "transformer").glob("*.safetensors"))))
    assert any(not torch.equal(student[k], original[k]) for k in original)


def test_an_interrupted_run_resumes_to_the_same_weights(teacher, tmp_path, monkeypatch):
    distill_tiny(teacher, tmp_path / "whole")
    restore = interrupt_at_call(monkeypatch, trainer_mod.reflow, "reflow_loss", 5)
    with pytest.raises(KeyboardInterrupt):
        distill_tiny(teacher, tmp_path / "cut")
    restore()
    state = json.loads((tmp_path / "cut.work" / "state.json").read_text())
    assert state["step"] == 3 and not (tmp_path / "cut").exists()  # the checkpoint of step 3, no half folder
    distill_tiny(teacher, tmp_path / "cut", resume=True)
    a = load_file(str(next((tmp_path / "whole" / "transformer").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "cut" / "transformer").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_are_made_once_and_reused(teacher, tmp_path, monkeypatch):
    distill_tiny(teacher, tmp_path / "s", train_steps=3)
    calls = []
    import diffboost.distill.teachers as teachers

    monkeypatch.setattr(teachers.FluxTeacher, "sample", lambda self, *a: calls.append(1))
    record = distill_tiny(teacher, tmp_path / "s", train_steps=3)  # finished run again: same pairs, no teacher
    assert calls == [] and record["step"] == 3


def test_training_lowers_the_reflow_loss(teacher, tmp_path):
    record = distill_tiny(teacher, tmp_path / "s", train_steps=60, save_every=60, lr=2e-3)
    losses = [h[1] for h in record["history"]]
    assert all(set(h[2]) == {"reflow"} and h[2]["reflow"] == h[1] for h in record["history"])
    assert losses[-1] < 0.7 * losses[0], losses


def test_folders_missing_above_the_student_are_made(teacher, tmp_path):
    """``diffboost distill`` with its default ``--out out/NAME-1step`` on a fresh checkout (no out/ yet)."""
    record = distill_tiny(teacher, tmp_path / "out" / "deeper" / "s", train_steps=1)
    assert record["step"] == 1 and (tmp_path / "out" / "deeper" / "s" / "distill.json").is_file()


def test_bad_input_is_refused_before_work(teacher, tmp_path):
    with pytest.raises(ValueError, match="is the teacher's folder"):
        distill_tiny(teacher, teacher)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="not a distilled model folder"):
        distill_tiny(teacher, tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        distill_tiny(teacher, tmp_path / "new", resume=True)
    with pytest.raises(ValueError, match="non-empty list"):
        distill(teacher, tmp_path / "x", [], DistillConfig(train_steps=1, pairs=1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill(tmp_path / "nope", tmp_path / "x", ["a"], DistillConfig())
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="is not a writable folder"):
        distill_tiny(teacher, tmp_path / "file" / "s")
    distill_tiny(teacher, tmp_path / "s", train_steps=3)
    with pytest.raises(ValueError, match="holds a run with other settings .*batch_size"):
        distill_tiny(teacher, tmp_path / "s", train_steps=3, batch_size=2)


@pytest.mark.parametrize("field, value, message", [
    ("method", "sim", "method='sim' is not supported; choose one of"),
    ("fake_updates", 0, "fake_updates=0 is out of range"),
    ("init", "", "init must be"),
    ("train_steps", 0, "train_steps=0 is out of range"),
    ("lr", 0.0, "lr=0.0 is out of range"),
    ("max_student_steps", 17, "max_student_steps=17"),
    ("batch_size", 2.5, "batch_size must be an int"),
])
def test_the_config_is_validated(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DistillConfig(**{field: value})


def test_a_unet_teacher_is_refused_by_name():
    with pytest.raises(UnsupportedTeacherError, match="Flux-architecture teachers .*not StableDiffusionPipeline"):
        teacher_for(make_sd(), {})


def test_runs_share_a_pairs_folder_made_with_the_same_settings(teacher, tmp_path, monkeypatch):
    shared = tmp_path / "pairs"
    distill_tiny(teacher, tmp_path / "a", train_steps=2, pairs_dir=shared)
    calls = []
    import diffboost.distill.teachers as teachers

    monkeypatch.setattr(teachers.FluxTeacher, "sample", lambda self, *a: calls.append(1))
    distill_tiny(teacher, tmp_path / "b", train_steps=2, method="dmd", fake_updates=1, pairs_dir=shared)
    assert calls == [] and json.loads((shared / "pairs.json").read_text())["seed"] == 0
    with pytest.raises(ValueError, match=r"made with other settings \(prompts_sha256, seed\)"):
        from diffboost.distill import DistillConfig, distill

        distill(teacher, tmp_path / "c", ["another prompt"], DistillConfig(train_steps=1, pairs=16, shard_size=8,
                                                                           seed=1), pairs=shared, progress=False)


def test_a_second_run_on_the_same_work_folder_is_refused_while_the_first_runs(teacher, tmp_path):
    """Two writers would interleave checkpoints: the work folder is locked (a POSIX record lock that the
    kernel drops when the holder dies, so a killed run leaves no stale lock)."""
    import subprocess
    import sys
    import time

    pytest.importorskip("fcntl")
    work = tmp_path / "s.work"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from diffboost.batch import FolderLock; "
        f"lock = FolderLock(Path({str(work)!r})); assert lock.claim('0'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another diffboost distill is running on the work folder"):
            distill_tiny(teacher, tmp_path / "s")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert distill_tiny(teacher, tmp_path / "s", train_steps=2)["step"] == 2  # the dead holder's lock is gone
