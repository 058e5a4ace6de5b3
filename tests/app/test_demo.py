"""The web demo's comparison logic on a tiny pipeline; the Gradio page when Gradio is installed."""

import numpy as np
import pytest

import diffboost
from diffboost.app.demo import DemoModel, build_app, handle
from diffboost.cli import build_parser
from factories import make_flux


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux")
    make_flux().save_pretrained(path)
    return DemoModel(path)


def test_compare_measures_both_and_leaves_the_pipeline_plain(model):
    result = model.compare("a red circle", "turbo", steps=10, seed=3)
    assert result.baseline.size == result.accelerated.size == (64, 64)
    # turbo: 4 warm-up steps and the last one computed, some of the other 5 cached
    assert result.total_calls == 10 and 5 <= result.computed_calls < 10
    assert result.baseline_s > 0 and result.accelerated_s > 0 and result.speedup > 0
    assert np.isfinite(result.psnr_db) and -1 <= result.ssim <= 1
    assert "EasyCache" in result.plugins[0] and "faster" in result.summary_markdown()
    assert diffboost.describe(model.pipe)["accelerated"] is False
    # the plain image is the pipeline's own output for that seed, every time
    again = model.compare("a red circle", "safe", steps=10, seed=3)
    np.testing.assert_array_equal(np.asarray(again.baseline), np.asarray(result.baseline))


@pytest.mark.parametrize("kwargs, needle", [
    ({"prompt": "  "}, "the prompt is empty"),
    ({"prompt": "x" * 501}, "at most 500"),
    ({"prompt": "x", "steps": 0}, "steps must be between 1 and 100"),
    ({"prompt": "x", "seed": -1}, r"the seed -1 is out of range; allowed: 0 <= the seed < 2\*\*63"),
    ({"prompt": "x", "seed": 2**64}, r"the seed 18446744073709551616 is out of range"),
    ({"prompt": "x", "seed": 2**63}, r"out of range"),
    ({"prompt": "x", "steps": 2.5}, "steps must be a whole number"),
    ({"prompt": "x", "preset": "warp"}, "unknown preset 'warp'"),
])
def test_bad_input_is_named(model, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        model.compare(**kwargs)


@pytest.mark.parametrize("steps, seed, needle", [
    (4, float("nan"), "the seed must be a whole number"),
    (4, float("inf"), "the seed must be a whole number"),
    (4, 1.5, "the seed must be a whole number"),
    (4, 1e30, "the seed 1000000000000000019884624838656 is out of range"),
    (float("nan"), 0, "steps must be a whole number"),
])
def test_page_fields_are_checked_before_any_work(model, steps, seed, needle):
    """The page's number fields send floats: NaN, infinities, fractions and huge seeds become a page
    error naming the field (not a raw "Overflow when unpacking long" from torch)."""
    gr = pytest.importorskip("gradio")
    from diffboost.app.demo import handle

    calls = model.pipe.transformer._diffboost_test_calls = []
    hook = model.pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(gr.Error, match=needle):
            handle(model, "a red circle", "fast", steps, seed)
    finally:
        hook.remove()
    assert calls == []


def test_page_builds_and_its_button_works(model):
    gr = pytest.importorskip("gradio")
    app = build_app(model)
    assert isinstance(app, gr.Blocks)
    plain, fast, summary = handle(model, "a red circle", "fast", 6, 0)
    assert plain.size == fast.size == (256, 256)  # 64 px enlarged for display
    assert "wall time" in summary
    with pytest.raises(gr.Error, match="the prompt is empty"):
        handle(model, "", "fast", 6, 0)


def test_demo_listens_on_localhost_by_default():
    args = build_parser().parse_args(["demo"])
    assert args.host == "127.0.0.1" and args.port == 7860


def test_a_stack_file_is_offered_and_a_step_skipping_stack_reports_its_calls(model):
    """``diffboost demo --plugins FILE``: the file's stack is a choice of its own; a stack that skips
    whole steps (SADA) reports the denoiser calls it saved like a cache does."""
    model.stacks["mine.toml"] = [diffboost.SADA(schedule=(3, 5), max_consecutive_skips=1)]
    try:
        result = model.compare("a red circle", "mine.toml", steps=10, seed=3)
        assert result.plugins[0].startswith("SADA(")
        assert (result.computed_calls, result.total_calls) == (8, 10)  # steps 3 and 5 skipped
        assert "| denoiser calls computed | 10 | 8 |" in result.summary_markdown()
        gr = pytest.importorskip("gradio")
        app = build_app(model)
        (dropdown,) = [b for b in app.blocks.values() if isinstance(b, gr.Dropdown)]
        assert dropdown.value == "mine.toml" and [c[0] for c in dropdown.choices][:2] == ["mine.toml", "fast"]
    finally:
        model.stacks.clear()


def test_a_student_next_to_the_model_is_offered_as_onestep(tmp_path):
    from factories import distill_tiny, save_flux_teacher

    teacher = save_flux_teacher(tmp_path / "shapes")
    distill_tiny(teacher, tmp_path / "shapes-1step", train_steps=3)
    model = DemoModel(teacher)
    result = model.compare("a red circle", "onestep", steps=4, seed=1)
    assert result.plugins[0].startswith("OneStep(") and (result.computed_calls, result.total_calls) == (1, 2)
    assert not hasattr(model.pipe, "_diffboost_handle")
    gr = pytest.importorskip("gradio")
    (dropdown,) = [b for b in build_app(model).blocks.values() if isinstance(b, gr.Dropdown)]
    assert dropdown.value == "fast" and [c[0] for c in dropdown.choices][-1] == "onestep"
