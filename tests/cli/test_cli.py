"""The ``diffboost`` command line on a tiny pipeline saved to disk."""

import subprocess
from pathlib import Path
import sys

import pytest
from PIL import Image

from diffboost.cli import build_parser, main
from factories import make_flux


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux")
    make_flux().save_pretrained(path)
    return path


def test_generate_compare_writes_images_and_reports(flux_folder, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle", "--model", str(flux_folder), "--steps", "10", "--size", "64",
                 "--preset", "turbo", "--compare", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert Image.open(tmp_path / "img_compare.png").size == (128, 64)
    for needle in ("baseline:", "speedup:", "PSNR vs baseline:", "denoiser calls computed: 6/10"):
        assert needle in text, text
    assert not list(tmp_path.glob(".img*")), "temporary files left behind"


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "not a Diffusers pipeline folder" in capsys.readouterr().err


def test_unknown_preset_is_reported(flux_folder, tmp_path, capsys):
    assert main(["generate", "--model", str(flux_folder), "--preset", "nope", "--steps", "2", "--size", "64",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "generate" in sub.choices
    for name in sub.choices:
        result = subprocess.run([sys.executable, "-m", "diffboost.cli", name, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: diffboost" in result.stdout


def test_default_call_kwargs_follow_the_model(flux_folder):
    from diffboost.cli import default_call_kwargs, load_pipeline

    pipe = load_pipeline(flux_folder)
    kw = default_call_kwargs(pipe, {})
    assert kw["height"] == kw["width"] == pipe.vae.config.sample_size
    assert kw["max_sequence_length"] == pipe.tokenizer_2.model_max_length < 512
    kw = default_call_kwargs(pipe, {"height": 48, "width": 80, "max_sequence_length": 8})
    assert (kw["height"], kw["width"], kw["max_sequence_length"]) == (48, 80, 8)
    # guidance settings shipped in diffboost.json reach the call when the pipeline takes them
    kw = default_call_kwargs(pipe, {"true_cfg_scale": 3.0, "negative_prompt": "", "guidance_scale": 2.0, "bogus": 1})
    assert kw["true_cfg_scale"] == 3.0 and kw["negative_prompt"] == "" and kw["guidance_scale"] == 2.0
    assert "bogus" not in kw


def test_bench_reads_the_model_call_defaults(flux_folder, tmp_path):
    import json
    import shutil

    from diffboost.bench.cli import model_call_defaults

    model = tmp_path / "m"
    shutil.copytree(flux_folder, model)
    assert model_call_defaults(model) == {}
    (model / "diffboost.json").write_text(json.dumps({"steps": 10, "true_cfg_scale": 2.5, "negative_prompt": ""}))
    assert model_call_defaults(model) == {"true_cfg_scale": 2.5, "negative_prompt": ""}
    # the size shipped with the model is the bench's default too (assets/flux-shapes-128 ran at 64 px)
    import argparse

    from diffboost.bench.cli import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (model / "diffboost.json").write_text(json.dumps({"height": 128, "width": 96}))
    settings = settings_from_args(parser.parse_args(["--model", str(model)]))
    assert (settings.height, settings.width) == (128, 96)
    settings = settings_from_args(parser.parse_args(["--model", str(model), "--height", "64", "--width", "64"]))
    assert (settings.height, settings.width) == (64, 64)


def test_non_positive_steps_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--steps", "0"])
    assert "--steps: must be a positive integer, got 0" in capsys.readouterr().err


def test_batch_makes_every_image_once_and_resumes(flux_folder, tmp_path, capsys):
    import json

    import numpy as np

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na blue square\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(flux_folder), "--steps", "4", "--size", "64", "--seeds", "2",
            "--preset", "turbo", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "made 4 images, 0 already done, 4 in all" in capsys.readouterr().out
    images = sorted(out.glob("*.png"))
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [p.name for p in images] and len(images) == 4
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a red circle", 0), ("a red circle", 1), ("a blue square", 0), ("a blue square", 1)]
    assert [p.name for p in out.glob(".*")] == [".diffboost.lock"], "temporary files left behind"
    first = {p.name: np.asarray(Image.open(p)) for p in images}

    # an interrupted run: one image lost, one manifest line torn; the re-run makes exactly those again
    images[1].unlink()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert main(args) == 0
    assert "made 2 images, 2 already done, 4 in all" in capsys.readouterr().out
    for p in sorted(out.glob("*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), first[p.name])  # same seed, same image
    assert main(args) == 0
    assert "made 0 images, 4 already done" in capsys.readouterr().out

    # changed settings are new jobs, the old images stay: another preset, another model folder
    assert main(args[:-3] + ["--preset", "none", "--out", str(out), "--quiet"]) == 0
    assert "made 4 images, 0 already done" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 8
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(flux_folder, other)
    assert main(["batch", str(prompts), "--model", str(other), *args[4:]]) == 0
    assert "made 4 images, 0 already done" in capsys.readouterr().out


def test_batch_jsonl_and_bad_input(flux_folder, tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a red circle", "seed": 7, "steps": 3}\n{"prompt": "a blue square"}\n')
    out = tmp_path / "o"
    assert main(["batch", str(good), "--model", str(flux_folder), "--steps", "2", "--size", "64",
                 "--preset", "none", "--out", str(out), "--quiet"]) == 0
    import json

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["steps"]) for r in records] == [(7, 3), (0, 2)]
    for text, needle in [("", "holds no prompts"), ('{"text": "x"}', "bad.jsonl:1: the row needs a non-empty 'prompt'"),
                         ('{"prompt": "x", "seed": -1}', "bad.jsonl:1: 'seed' -1 is out of range; allowed: 0 <="),
                         ('{"prompt": ""}\n{"prompt": "y", "seed": 18446744073709551616}',
                          "bad.jsonl:2: 'seed' 18446744073709551616 is out of range"),
                         ('{"prompt": "x", "seed": 1.5}', "bad.jsonl:1: 'seed' must be an integer"),
                         ('{"prompt": "x", "steps": true}', "bad.jsonl:1: 'steps' must be an integer"),
                         ('{"prompt": "x", "steps": 5000}', "'steps' 5000 is out of range; allowed: 1 to 1000"),
                         ('{"prompt": "x", "cfg": 2}', "unknown key 'cfg'; allowed: prompt, negative_prompt, seed"), ("{oops", "not valid JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        assert main(["batch", str(bad), "--model", str(flux_folder), "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["batch", str(good), "--model", str(flux_folder), "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_plugins_file_in_generate_and_batch(flux_folder, tmp_path, capsys):
    import json

    import diffboost

    stack = diffboost.save([diffboost.TaylorSeer(interval=3, warmup=2)], tmp_path / "stack.toml")
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(flux_folder), "--steps", "8", "--size", "64", "--plugins", str(stack),
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "plugins: TaylorSeer(interval=3, order=1, warmup=2" in text and "denoiser calls computed: 4/8" in text
    with pytest.raises(SystemExit):  # one or the other
        main(["generate", "--preset", "safe", "--plugins", str(stack)])
    assert "not allowed with argument" in capsys.readouterr().err

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    args = ["batch", str(prompts), "--model", str(flux_folder), "--steps", "4", "--size", "64", "--plugins",
            str(stack), "--out", str(tmp_path / "b"), "--quiet"]
    assert main(args) == 0 and main(args) == 0
    assert "made 0 images, 1 already done" in capsys.readouterr().out
    diffboost.save([diffboost.TaylorSeer(interval=2, warmup=2)], stack)  # the file changed: a new image
    assert main(args) == 0
    assert "made 1 images, 0 already done" in capsys.readouterr().out
    labels = [json.loads(line)["plugins"] for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    assert len(set(labels)) == 2 and all(label.startswith("stack.toml#") for label in labels)


def test_a_bad_plugins_file_fails_before_loading(flux_folder, tmp_path, monkeypatch, capsys):
    import diffboost.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    bad = tmp_path / "bad.toml"
    bad.write_text('format = "diffboost-stack"\nversion = 1\n[[plugins]]\nplugin = "TaylorSeer"\ninterval = 0\n')
    assert main(["generate", "--model", str(flux_folder), "--plugins", str(bad)]) == 2
    assert "plugins[0] (TaylorSeer): TaylorSeer.interval=0 is out of range" in capsys.readouterr().err
    assert main(["batch", str(bad), "--model", str(flux_folder), "--plugins", str(tmp_path / "none.toml")]) == 2


def test_calibrate_writes_a_stack_that_generate_takes(flux_folder, tmp_path, capsys):
    import diffboost

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "fit.toml"
    code = main(["calibrate", "--model", str(flux_folder), "--preset", "fast", "--prompts", str(prompts), "--steps", "10",
                 "--size", "64", "--trials", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert code in (0, 1)  # 1: target not reached; the file is written either way
    assert "calibrated fast on 2 prompts x 1 seeds, 10 steps" in text and "(target 38 + 2 dB margin)" in text
    fit = diffboost.load(out)
    assert type(fit[0]).__name__ == "EasyCache" and fit[0].order == 0  # the preset's other fields kept
    assert f"threshold={fit[0].threshold:g}:" in text
    assert main(["generate", "--model", str(flux_folder), "--steps", "10", "--size", "64", "--plugins", str(out),
                 "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    also = diffboost.save([diffboost.TaylorSeer(interval=2, warmup=1)], tmp_path / "also.toml")
    code = main(["calibrate", "--model", str(flux_folder), "--preset", "turbo", "--also", str(also), "--prompts",
                 str(prompts), "--steps", "10", "--size", "64", "--trials", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code in (0, 1) and "also fitted: " in text
    assert type(diffboost.load(out)[0]).__name__ in ("EasyCache", "TaylorSeer")


def test_calibrate_refuses_before_loading(flux_folder, tmp_path, monkeypatch, capsys):
    import diffboost.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    stack = tmp_path / "s.toml"
    import diffboost

    diffboost.save([diffboost.EasyCache()], stack)
    cases = [
        (["--preset", "none"], "needs a preset (safe, fast, turbo) or --plugins FILE"),
        (["--plugins", str(stack)], "--target DB is needed with --plugins"),
        (["--out", str(tmp_path / "x.png")], "a stack file ends in .toml or .json"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--steps", "0"], "must be a positive integer"),
    ]
    for extra, message in cases:
        try:
            code = main(["calibrate", "--model", str(flux_folder), *extra])
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        assert code == 2, extra
        assert message in capsys.readouterr().err, extra


def _manifest(out):
    import json

    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_batch_rich_prompt_files_record_bad_rows_and_go_on(flux_folder, tmp_path, capsys):
    import json

    import numpy as np

    from diffboost.media import read_settings

    rows = tmp_path / "rows.csv"
    rows.write_bytes(
        b"prompt,seed,steps,height,width,negative_prompt,guidance,max_sequence_length\n"  # row 1: the header
        b"a red circle,3,2,64,32,blurry,,\n"                # 2: good, not square, a negative prompt
        b",1,2,,,,,\n"                                      # 3: empty prompt
        b"a blue square,one,2,,,,,\n"                       # 4: seed not an integer
        b"a green star,5,2,72,72,,,\n"                      # 5: 72 px passes the limits, the pipeline wants 16s
        b"caf\xe9 au lait,1,2,,,,,\n"                       # 6: not UTF-8
        b'"a circle, yellow",9,2,,,,2.5,16\n'              # 7: good: a quoted comma, guidance, an extra argument
    )
    out = tmp_path / "out"
    args = ["batch", str(rows), "--model", str(flux_folder), "--size", "64", "--preset", "none", "--out", str(out),
            "--quiet"]
    assert main(args) == 1  # some rows could not be made: the exit code says so, the good ones are made
    printed = capsys.readouterr()
    assert "made 2 images, 0 already done, 3 in all" in printed.out and "4 row(s) could not be made" in printed.out
    records = _manifest(out)
    done = [r for r in records if r["status"] == "done"]
    errors = {r["row"]: r["error"] for r in records if r["status"] == "error"}
    assert sorted(errors) == [3, 4, 5, 6]
    assert "rows.csv:3: the row needs a non-empty 'prompt'" in errors[3]
    assert "rows.csv:4: 'seed' must be an integer, got 'one'" in errors[4]
    assert "height 72 px is not a multiple of 16" in errors[5]
    assert "rows.csv:6: not UTF-8 text" in errors[6]
    by_row = {r["row"]: r for r in done}
    assert sorted(by_row) == [2, 7]
    assert (by_row[2]["height"], by_row[2]["width"], by_row[2]["negative_prompt"]) == (64, 32, "blurry")
    assert json.loads(by_row[7]["extra"]) == {"max_sequence_length": 16} and by_row[7]["guidance"] == 2.5
    assert Image.open(out / by_row[2]["file"]).size == (32, 64)
    settings = read_settings(out / by_row[7]["file"])
    assert settings["prompt"] == "a circle, yellow" and settings["seed"] == 9 and settings["guidance"] == 2.5
    assert settings["extra"] == {"max_sequence_length": 16} and settings["model"] == str(flux_folder.resolve())
    assert settings["diffboost_version"] and settings["plugins"] == "none"
    assert Image.open(out / by_row[2]["file"]).text["negative_prompt"] == "blurry"
    first = {r["file"]: np.asarray(Image.open(out / r["file"])) for r in done}

    # the file fixed: the bad rows' errors go, the fixed rows are made, the good ones are kept
    rows.write_text("prompt,seed,steps,height,width,negative_prompt,guidance,max_sequence_length\n"
                    "a red circle,3,2,64,32,blurry,,\n"
                    '"a circle, yellow",9,2,,,,2.5,16\n'
                    "a green star,5,2,80,80,,,\n")
    assert main(args) == 0
    assert "made 1 images, 2 already done, 3 in all" in capsys.readouterr().out  # moved rows are not made again
    records = _manifest(out)
    assert not [r for r in records if r["status"] == "error"]
    for name, pixels in first.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), pixels)


def test_batch_unknown_extra_arguments_and_reserved_ones_are_row_errors(flux_folder, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red circle", "steps": 2}\n'
                    '{"prompt": "x", "cfg_rescale": 0.7}\n'
                    '{"prompt": "x", "latents": [1]}\n'
                    '{"prompt": "x", "num_inference_steps": 3}\n'
                    '{"prompt": "x", "max_sequence_length": {"a": 1}}\n'
                    '["not", "an", "object"]\n')
    out = tmp_path / "out"
    assert main(["batch", str(rows), "--model", str(flux_folder), "--size", "64", "--preset", "none", "--out",
                 str(out), "--quiet"]) == 1
    errors = {r["row"]: r["error"] for r in _manifest(out) if r["status"] == "error"}
    assert "unknown key 'cfg_rescale'" in errors[2] and "max_sequence_length" in errors[2]  # names what is allowed
    assert "'latents' is set by diffboost" in errors[3]
    assert "set 'steps' instead of 'num_inference_steps'" in errors[4]
    assert "'max_sequence_length' must be a number, text" in errors[5]
    assert "must be an object with a 'prompt' key" in errors[6]


def test_batch_size_groups_rows_and_keeps_each_image(flux_folder, tmp_path, capsys):
    """--batch-size 4: one call per 4 rows of equal settings, a generator per row. The images equal
    the one-by-one images up to float rounding (batched matrix products may round differently):
    at most one level of 255 on a few pixels."""
    import numpy as np

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "shape {i}", "seed": {i}, "steps": 2}}\n' for i in range(5))
                    + '{"prompt": "wide", "seed": 1, "steps": 2, "height": 32, "width": 64}\n')
    outs = {}
    for n in ("1", "4"):
        out = tmp_path / f"out{n}"
        calls = []
        import diffusers

        original = diffusers.FluxPipeline.__call__

        def counting(self, *a, **k):
            calls.append(k["prompt"])
            return original(self, *a, **k)

        diffusers.FluxPipeline.__call__ = counting
        try:
            assert main(["batch", str(rows), "--model", str(flux_folder), "--size", "64", "--preset", "none",
                         "--out", str(out), "--quiet", "--batch-size", n]) == 0
        finally:
            diffusers.FluxPipeline.__call__ = original
        outs[n] = {p.name: np.asarray(Image.open(p)).astype(int) for p in out.glob("*.png")}
        if n == "4":  # rows 0-3 together, row 4 alone (the group is full), the wide row alone (another size)
            assert [len(c) if isinstance(c, list) else 1 for c in calls] == [4, 1, 1]
        else:
            assert len(calls) == 6
    assert outs["1"].keys() == outs["4"].keys() and len(outs["1"]) == 6
    for name in outs["1"]:
        assert np.abs(outs["1"][name] - outs["4"][name]).max() <= 1, name


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from factories import make_wan

    path = tmp_path_factory.mktemp("wan")
    make_wan().save_pretrained(path)
    return path


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["mp4", "no-ffmpeg"])
def test_video_generate_and_batch_write_readable_clips(wan_folder, tmp_path, capsys, monkeypatch, ffmpeg):
    from diffboost import media

    if not ffmpeg:
        monkeypatch.setattr(media, "ffmpeg_available", lambda: False)
    elif not media.ffmpeg_available():
        pytest.skip("imageio-ffmpeg is not installed (pip install 'diffboost[video]')")
    suffix = ".mp4" if ffmpeg else media.video_suffix()
    assert main(["generate", "a red circle", "--model", str(wan_folder), "--steps", "2", "--size", "32", "--frames",
                 "5", "--preset", "none", "--out", str(tmp_path / "clip.png"), "--quiet"]) == 0
    clip = tmp_path / f"clip{suffix}"
    assert "(5 frames)" in capsys.readouterr().out
    frames = media.read_video(clip)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    settings = media.read_settings(clip)
    assert (settings["prompt"], settings["seed"], settings["num_frames"], settings["plugins"]) == (
        "a red circle", 0, 5, "none")

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red circle", "seed": 1}\n{"prompt": "a blue square", "num_frames": 9}\n')
    out = tmp_path / "clips"
    args = ["batch", str(rows), "--model", str(wan_folder), "--steps", "2", "--size", "32", "--frames", "5",
            "--preset", "none", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "made 2 videos" in capsys.readouterr().out
    records = [r for r in _manifest(out) if r["status"] == "done"]
    assert [Path(r["file"]).suffix for r in records] == [suffix, suffix]
    assert [len(media.read_video(out / r["file"])) for r in records] == [5, 9]
    assert [media.read_settings(out / r["file"])["extra"]["num_frames"] for r in records] == [5, 9]
    assert main(args) == 0
    assert "made 0 videos, 2 already done" in capsys.readouterr().out


def test_frames_on_an_image_model_is_refused(flux_folder, tmp_path, capsys):
    assert main(["generate", "--model", str(flux_folder), "--frames", "5", "--out", str(tmp_path / "a.png")]) == 2
    assert "--frames" in capsys.readouterr().err


def test_generate_png_carries_its_settings(flux_folder, tmp_path, capsys):
    from diffboost.media import read_settings

    out = tmp_path / "img.png"
    assert main(["generate", "a blue square", "--model", str(flux_folder), "--steps", "2", "--size", "64",
                 "--seed", "5", "--guidance", "2.0", "--preset", "fast", "--out", str(out), "--quiet"]) == 0
    settings = read_settings(out)
    assert (settings["prompt"], settings["seed"], settings["steps"], settings["height"], settings["guidance"]) == (
        "a blue square", 5, 2, 64, 2.0)
    assert settings["plugins"] == "fast" and settings["plugin_stack"]["plugins"]
    text = Image.open(out).text
    assert text["prompt"] == "a blue square" and text["seed"] == "5"


def test_outputs_record_the_size_made_when_the_model_chose_it(flux_folder, tmp_path, capsys):
    from diffboost.media import read_settings

    rows = tmp_path / "rows.txt"
    rows.write_text("a red circle\n")
    out = tmp_path / "o"
    assert main(["batch", str(rows), "--model", str(flux_folder), "--steps", "2", "--preset", "none",
                 "--out", str(out), "--quiet"]) == 0
    (png,) = out.glob("*.png")
    settings = read_settings(png)
    assert (settings["height"], settings["width"]) == Image.open(png).size[::-1] and settings["height"] > 0
