"""OneStep: a distilled student served inside the teacher's pipeline. It gives what the student's
own pipeline folder gives (same seed, same steps, the CFG pass answered by the conditional one),
remove() restores the teacher bit for bit, caches and step plugins are refused, attention kernels
stack, and bad input is named."""

from __future__ import annotations

import json

import pytest
import torch

import diffboost
from diffboost import EasyCache, IncompatiblePluginsError, OneStep, QuantizedAttention, SADA, UnsupportedPipelineError
from factories import TEACHER_SETTINGS, distill_tiny, make_flux_wide, save_flux_teacher


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("onestep")
    teacher = save_flux_teacher(root / "teacher")
    distill_tiny(teacher, root / "student", train_steps=3)
    return teacher, root / "student"


def _load(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe, steps, cfg=True):
    kw = dict(height=32, width=32, max_sequence_length=8, output_type="pt", num_inference_steps=steps,
              generator=torch.Generator().manual_seed(3))
    if cfg:
        kw.update(true_cfg_scale=TEACHER_SETTINGS["true_cfg_scale"], negative_prompt="")
    return pipe("a blue square", **kw).images


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_it_gives_the_student_pipelines_images_and_remove_restores_the_teacher(folders, steps):
    teacher_dir, student_dir = folders
    teacher, student = _load(teacher_dir), _load(student_dir)
    base = _gen(teacher, 4)
    own = _gen(student, steps, cfg=False)
    with diffboost.accelerated(teacher, OneStep(str(student_dir), steps=steps)):
        before = diffboost.call_stats(teacher)[0]  # nothing run yet: empty, not an error
        served = _gen(teacher, 28)  # the call's 28 steps and CFG: the plugin decides both
        stats = diffboost.call_stats(teacher)[0]
        assert teacher.scheduler.num_inference_steps == steps
        assert teacher._diffboost_handle.tracker.num_steps == steps
    assert before.reused == {} and before.skipped_steps == ()
    assert torch.equal(served, own)
    assert stats.details["plugin"] == repr(OneStep(str(student_dir), steps=steps)) and stats.details["steps"] == steps
    assert stats.details["denoiser_calls"] == steps and stats.details["cfg_passes_shared"] == steps
    assert stats.reused == {"uncond": steps} and stats.skipped_steps == tuple(range(steps))
    assert torch.equal(_gen(teacher, 4), base)


def test_it_stacks_with_attention_kernels_and_refuses_caches_and_step_plugins(folders):
    teacher_dir, student_dir = folders
    teacher = _load(teacher_dir)
    base = _gen(teacher, 4)
    with diffboost.accelerated(teacher, [QuantizedAttention(), OneStep(str(student_dir))]):
        out = _gen(teacher, 4)
        kinds = {s.plugin.split("(")[0] for s in diffboost.call_stats(teacher)}
    assert torch.isfinite(out).all() and kinds == {"QuantizedAttention", "OneStep"}
    for other, why in ((EasyCache(), "nothing to cache"), (SADA(), "no steps to skip")):
        with pytest.raises(IncompatiblePluginsError, match=f"OneStep cannot be stacked with .*{why}"):
            diffboost.apply(teacher, [OneStep(str(student_dir)), other])
        assert not hasattr(teacher, "_diffboost_handle")
    assert torch.equal(_gen(teacher, 4), base)


def test_a_stack_file_with_onestep_round_trips(folders, tmp_path):
    _, student_dir = folders
    path = tmp_path / "one.toml"
    diffboost.save([OneStep(str(student_dir), steps=2)], path)
    assert diffboost.load(path) == [OneStep(str(student_dir), steps=2)]


def test_bad_input_is_named(folders, tmp_path):
    teacher_dir, student_dir = folders
    teacher = _load(teacher_dir)
    with pytest.raises(ValueError, match="OneStep.path must name a student folder"):
        OneStep()
    with pytest.raises(ValueError, match="steps=17 is out of range"):
        OneStep(str(student_dir), steps=17)
    with pytest.raises(ValueError, match="steps=0 is out of range"):
        OneStep(str(student_dir), steps=0)
    with pytest.raises(FileNotFoundError, match="not a distilled student folder"):
        diffboost.apply(teacher, OneStep(str(teacher_dir)))
    with pytest.raises(ValueError, match=r"trained for \[1, 2, 3, 4\] steps"):
        diffboost.apply(teacher, OneStep(str(student_dir), steps=8))
    wide = make_flux_wide()
    with pytest.raises(UnsupportedPipelineError, match="another transformer configuration"):
        diffboost.apply(wide, OneStep(str(student_dir)))
    for pipe in (teacher, wide):
        assert not hasattr(pipe, "_diffboost_handle")
    info = json.loads((student_dir / "distill.json").read_text())
    assert info["student_steps"] == [1, 2, 3, 4]


def test_a_scheduler_replaced_after_apply_is_refused(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher_dir, student_dir = folders
    teacher = _load(teacher_dir)
    diffboost.apply(teacher, OneStep(str(student_dir)))
    try:
        teacher.scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler.config)
        with pytest.raises(RuntimeError, match="scheduler was replaced after apply"):
            _gen(teacher, 4)
    finally:
        diffboost.remove(teacher)


def test_under_model_cpu_offload_and_in_bfloat16(folders):
    teacher_dir, student_dir = folders
    own = _gen(_load(student_dir), 1, cfg=False)
    teacher = _load(teacher_dir)
    teacher.enable_model_cpu_offload(device="cpu")
    base = _gen(teacher, 4)
    with diffboost.accelerated(teacher, OneStep(str(student_dir))):
        assert torch.equal(_gen(teacher, 4), own)
    assert torch.equal(_gen(teacher, 4), base)
    half = _load(teacher_dir).to(torch.bfloat16)
    plain = _gen(half, 4)
    with diffboost.accelerated(half, OneStep(str(student_dir))):
        out = _gen(half, 4)
        assert half.transformer.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all() and (out.float() - own.float()).abs().mean() < 0.05
    assert torch.equal(_gen(half, 4), plain)


def test_a_student_record_without_step_counts_serves_one_step_and_configs_must_match_key_for_key(folders, tmp_path):
    import shutil

    teacher_dir, student_dir = folders
    teacher = _load(teacher_dir)
    bare = tmp_path / "bare"
    shutil.copytree(student_dir, bare)
    info = json.loads((bare / "distill.json").read_text())
    del info["student_steps"]
    (bare / "distill.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"trained for \[1\] steps"):
        diffboost.apply(teacher, OneStep(str(bare), steps=2))
    with diffboost.accelerated(teacher, OneStep(str(bare), steps=1)):
        assert diffboost.call_stats(teacher)[0].details == {}
    config = json.loads((bare / "transformer" / "config.json").read_text())
    (bare / "transformer" / "config.json").write_text(json.dumps({**config, "extra_field": 1}))
    with pytest.raises(UnsupportedPipelineError, match=r"another transformer configuration than this pipeline \(extra_field\)"):
        diffboost.apply(teacher, OneStep(str(bare)))


def test_student_weights_that_do_not_match_the_denoiser_are_named(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher_dir, student_dir = folders
    bad = tmp_path / "bad"
    shutil.copytree(student_dir, bad)
    (weights_file,) = (bad / "transformer").glob("*.safetensors")
    weights = load_file(str(weights_file))
    dropped = sorted(weights)[0]
    weights["not.a.weight"] = weights.pop(dropped)
    save_file(weights, str(weights_file))
    with pytest.raises(UnsupportedPipelineError,
                       match=rf"do not match this transformer \(missing \['{dropped}'\], unexpected \['not.a.weight'\]\)"):
        diffboost.apply(_load(teacher_dir), OneStep(str(bad)))
