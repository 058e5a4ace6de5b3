"""The reference VLM trainer: a few steps, resume bit-identical, a loadable LLaVA folder."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffboost_reference.data import vqa
from diffboost_reference.training import train_vlm


def _args(tmp: Path, name: str, steps: int, tower: int = 0) -> list[str]:
    return ["--out", str(tmp / f"{name}-out"), "--work", str(tmp / f"{name}-work"), "--steps", str(steps),
            "--batch-size", "4", "--save-every", "2", "--eval-every", "100", "--eval-examples", "4",
            "--final-examples", "8", "--warmup", "2", "--tower-steps", str(tower)]


def test_resumed_run_equals_an_uninterrupted_one_and_loads(tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    train_vlm.main(_args(tmp_path, "straight", 3, tower=3))  # 3 tower-only steps, then 3 of the whole model
    cut = ["--max-minutes", "1e-9"]  # each of these runs stops, checkpointed, after one step
    for _ in range(4):  # steps 1-3 train the tower alone, step 4 the whole model
        train_vlm.main(_args(tmp_path, "resumed", 3, tower=3) + cut)
    train_vlm.main(_args(tmp_path, "resumed", 3, tower=3))  # the same command without the limit finishes
    log = (tmp_path / "resumed-work" / "train.log").read_text()
    assert all(f"resumed at step {n}" in log for n in (1, 2, 3, 4))
    assert "tower: patch shape accuracy" in (tmp_path / "straight-work" / "train.log").read_text()
    a = load_file(str(tmp_path / "straight-out" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed-out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "straight-out"
    info = json.loads((out / "train.json").read_text())
    assert info["steps"] == 6 and info["recipe"]["describe_share"] == 0.5 and info["recipe"]["tower_steps"] == 3
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["held_out_examples"] == 8 and 0.0 <= acc["accuracy"]["all"] <= 1.0
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in out.iterdir())
    model = LlavaForConditionalGeneration.from_pretrained(out, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(out)
    e = vqa.make_example(0)
    enc = processor(images=e.pil(), text=f"<image> {e.question}", return_tensors="pt")
    assert enc["input_ids"].shape[1] == 256 + len(e.question.split())
    assert model.generate(**enc, max_new_tokens=1).shape[1] == enc["input_ids"].shape[1] + 1


def test_train_batch_labels_the_answers_only() -> None:
    from diffboost_reference.training import vlm_model

    processor = vlm_model.build_processor()
    batch, examples = train_vlm.train_batch(processor, 0, 4, describe_share=0.5)
    tok = processor.tokenizer
    for i, e in enumerate(examples):
        labelled = tok.convert_ids_to_tokens(batch["input_ids"][i][batch["labels"][i] != -100].tolist())
        answer = vqa.describe(e) if i < 2 else e.answer
        assert labelled == answer.split() + ["</s>"]


def test_second_stage_starts_from_another_runs_weights(tmp_path: Path) -> None:
    train_vlm.main(_args(tmp_path, "stage1", 2))
    first = tmp_path / "stage1-work" / "checkpoint.safetensors"
    train_vlm.main(_args(tmp_path, "stage2", 2) + ["--init", str(first), "--describe-share", "0"])
    log = (tmp_path / "stage2-work" / "train.log").read_text()
    assert f"initialised from {first}" in log
    info = json.loads((tmp_path / "stage2-out" / "train.json").read_text())
    assert info["recipe"]["init"] == str(first) and info["recipe"]["describe_share"] == 0.0
    import pytest

    with pytest.raises(SystemExit):
        train_vlm.main(_args(tmp_path, "stage3", 2) + ["--init", str(tmp_path / "missing.safetensors")])


def test_vision_tower_size_options(tmp_path: Path) -> None:
    import pytest

    train_vlm.main(_args(tmp_path, "small", 1) + ["--vision-layers", "3", "--vision-width", "32"])
    config = json.loads((tmp_path / "small-out" / "config.json").read_text())["vision_config"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (3, 32, 128)
    for bad in (["--vision-layers", "1"], ["--vision-width", "30"], ["--vision-width", "0"]):
        with pytest.raises(SystemExit):
            train_vlm.main(_args(tmp_path, "bad", 1) + bad)


def test_tower_steps_train_the_vision_tower_alone(tmp_path: Path) -> None:
    from diffboost_reference.training import vlm_model

    for _ in range(2):  # two tower-only steps, each run cut short after one
        train_vlm.main(_args(tmp_path, "tower", 1, tower=2) + ["--max-minutes", "1e-9"])
    trained = load_file(str(tmp_path / "tower-work" / "checkpoint.safetensors"))
    fresh = vlm_model.build_model(len(vlm_model.build_processor().tokenizer)).state_dict()
    prefix = "module.model."
    weights = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
    assert weights.keys() == fresh.keys()
    changed = {k for k in weights if not torch.equal(weights[k], fresh[k])}
    assert changed and all("vision_tower" in k for k in changed)  # the language model and projector are untouched
    assert any("position_embedding" in k for k in changed)


def test_sincos_positions_start_the_tower() -> None:
    import math

    import pytest

    from diffboost_reference.training import vlm_model

    codes = vlm_model.sincos_2d(16, 8)
    assert codes.shape == (256, 8)
    # patch (row 1, col 2) is index 18: x = 2, y = 1; the first frequency of each axis is 1 radian per patch
    assert codes[18].tolist() == pytest.approx([math.sin(2), math.sin(2e-2), math.cos(2), math.cos(2e-2),
                                                math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)], abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        vlm_model.sincos_2d(4, 6)
    table = vlm_model.build_model(20).model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(table[1:], vlm_model.sincos_2d(16, 64)) and not table[0].any()
    plain = vlm_model.build_model(20, sincos_positions=False).model.vision_tower.embeddings.position_embedding.weight
    assert not torch.equal(plain[1:], table[1:])
