"""diffboost distill on the command line, and the student in generate (--preset onestep, or the
student's own folder)."""

from __future__ import annotations

import json

import pytest

from diffboost.cli import main
from factories import distill_tiny, save_flux_teacher


@pytest.fixture(scope="module")
def teacher_with_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-distill")
    teacher = save_flux_teacher(root / "shapes")
    distill_tiny(teacher, root / "shapes-1step", train_steps=3)
    return teacher, root / "shapes-1step"


def test_distill_writes_a_student_and_a_rerun_continues(tmp_path, capsys):
    teacher = save_flux_teacher(tmp_path / "t")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--steps", "4", "--pairs", "8",
            "--batch-size", "4", "--save-every", "2", "--prompts", str(prompts), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student: " in out and "4 steps" in out and "--steps 1 --preset none" in out
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["prompts"] == 2
    assert main(args + ["--resume"]) == 0  # finished: the rerun loads the last checkpoint and exports again
    assert main(args[:-1] + ["--steps", "5", "--quiet"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "/nonexistent"], "does not exist"),
    (["--method", "sim"], "invalid choice: 'sim'"),
    (["--lr", "-1"], "lr=-1.0 is out of range"),
])
def test_distill_bad_input(extra, message, tmp_path, capsys):
    code = main(["distill", "--out", str(tmp_path / "x"), "--quiet", *extra]) if "--method" not in extra else None
    if code is None:
        with pytest.raises(SystemExit):
            main(["distill", "--out", str(tmp_path / "x"), *extra])
    else:
        assert code == 2
    assert message in capsys.readouterr().err


def test_generate_with_the_student(teacher_with_student, tmp_path, capsys):
    teacher, student = teacher_with_student
    assert main(["generate", "--model", str(teacher), "--preset", "onestep", "--out", str(tmp_path / "a.png"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    # one step: the conditional pass computes, the CFG pass shares its output
    assert "plugins: OneStep(path=" in out and "denoiser calls computed: 1/2" in out
    assert (tmp_path / "a.png").is_file()
    assert main(["generate", "--model", str(student), "--steps", "1", "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    assert "none (plain pipeline)" in capsys.readouterr().out
    assert main(["generate", "--model", str(student), "--preset", "onestep", "--out", str(tmp_path / "c.png")]) == 2
    assert "no distilled student next to" in capsys.readouterr().err
