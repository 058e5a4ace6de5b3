"""A new user's mistakes on the command line: one clear line and an exit code, before any expensive
work (the model is never loaded), never a traceback, never a silently wrong image."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import diffboost.cli as cli
from diffboost.cli import main
from factories import make_flux, make_sd


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux")
    make_flux().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_true_cfg_folder(tmp_path_factory):
    """A Flux model like the default reference model: no guidance embedding, true CFG."""
    path = tmp_path_factory.mktemp("flux_cfg")
    make_flux(guidance_embeds=False).save_pretrained(path)
    (path / "diffboost.json").write_text(json.dumps({"height": 64, "width": 64, "steps": 4, "true_cfg_scale": 3.0,
                                                     "negative_prompt": ""}))
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a command loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def _err(capsys):
    text = capsys.readouterr().err
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize("args, needle", [
    (["--size", "100000"], "--size 100000 px is out of range for a model made for 64 px; allowed: 16 to 1024 px"),
    (["--size", "100"], "not a multiple of 8"),
    (["--steps", "5000"], "--steps 5000 is out of range; allowed: 1 to 1000"),
    (["--seed", "-1"], "--seed -1 is out of range; allowed: 0 <= --seed < 2**63"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["--guidance", "-3"], "--guidance -3 is out of range; allowed: 0 to 100"),
    (["--preset", "warp"], "unknown preset 'warp'; available presets: ['fast', 'safe', 'turbo'], onestep"),
    (["--preset", "warp", "--compare"], "unknown preset 'warp'"),
    (["--out", "x.gif"], "unsupported image file type '.gif'"),
])
def test_generate_refuses_before_loading(flux_true_cfg_folder, tmp_path, no_loading, capsys, args, needle):
    os.chdir(tmp_path)
    assert main(["generate", "--model", str(flux_true_cfg_folder), *args]) == 2
    assert needle in _err(capsys)


@pytest.mark.parametrize("args, needle", [
    (["--seeds", "300000000"], "--seeds 300000000 is out of range; allowed: 1 to 100000"),
    (["--seed", str(2**63 - 1), "--seeds", "2"], "go past the largest seed"),
    (["--seed", str(2**64)], "is out of range"),
    (["--size", "100000"], "--size 100000 px is out of range"),
    (["--guidance", "nan"], "must be a finite number"),
    (["--preset", "warp"], "unknown preset 'warp'"),
])
def test_batch_refuses_before_loading(flux_true_cfg_folder, tmp_path, no_loading, capsys, args, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["batch", str(prompts), "--model", str(flux_true_cfg_folder), "--out", str(tmp_path / "o"),
                 *args]) == 2
    assert needle in _err(capsys)


def test_output_paths_are_checked_before_loading(flux_true_cfg_folder, tmp_path, no_loading, capsys):
    model = ["--model", str(flux_true_cfg_folder)]
    (tmp_path / "folder").mkdir()
    assert main(["generate", *model, "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder; give an image file name" in _err(capsys)
    (tmp_path / "afile").write_text("x")
    assert main(["generate", *model, "--out", str(tmp_path / "afile" / "x.png")]) == 2
    assert "afile is a file, not a folder" in _err(capsys)
    unwritable = "/proc/diffboost-test" if os.geteuid() == 0 else str(tmp_path / "ro")
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
    assert main(["generate", *model, "--out", f"{unwritable}/x.png"]) == 2
    assert "cannot create files in" in _err(capsys)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["batch", str(prompts), *model, "--out", str(tmp_path / "afile")]) == 2
    assert "afile is a file; give a folder" in _err(capsys)
    assert main(["batch", str(prompts), *model, "--out", f"{unwritable}/batch"]) == 2
    assert "cannot create files in" in _err(capsys)


def test_bin_only_model_folder_is_refused(flux_folder, tmp_path, no_loading, capsys):
    model = tmp_path / "m"
    shutil.copytree(flux_folder, model)
    for f in (model / "transformer").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    assert main(["generate", "--model", str(model)]) == 2
    text = _err(capsys)
    assert "transformer holds only pickled weights (diffusion_pytorch_model.bin); diffboost loads safetensors only" in text
    assert "save_pretrained(path, safe_serialization=True)" in text


def test_missing_default_model_says_how_to_fix(tmp_path, monkeypatch, no_loading, capsys):
    monkeypatch.setenv("DIFFBOOST_ASSETS", str(tmp_path))
    assert main(["generate"]) == 2
    text = _err(capsys)
    assert f"the embedded default model (flux-shapes) is not installed (looked in: {tmp_path / 'flux-shapes'})" in text
    assert "pip install" in text and "--model PATH" in text


def test_default_model_is_found_without_the_environment(monkeypatch):
    monkeypatch.delenv("DIFFBOOST_ASSETS", raising=False)
    path = cli.default_model_path()
    assert (path / "model_index.json").is_file() and path.name == "flux-shapes"


@pytest.mark.parametrize("error, code, needle", [
    (KeyboardInterrupt(), 130, "interrupted; finished files are kept"),
    (PermissionError(13, "Permission denied", "/x/y.png"), 1, "error: Permission denied: /x/y.png"),
    (OSError(28, "No space left on device"), 1, "error: No space left on device"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40 GB"), 1, "out of memory"),
    (MemoryError(), 1, "out of memory (MemoryError); try a smaller --size"),
])
def test_failures_during_a_run_end_in_one_line(flux_true_cfg_folder, tmp_path, monkeypatch, capsys, error, code,
                                                needle):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "_generate_once", fail)
    assert main(["generate", "--model", str(flux_true_cfg_folder), "--out", str(tmp_path / "x.png"), "--quiet"]) == code
    text = _err(capsys)
    assert needle in text
    assert [line for line in text.splitlines() if line.strip()] == [next(l for l in text.splitlines() if needle in l)]


def test_a_bug_still_shows_its_traceback(flux_true_cfg_folder, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("some bug")

    monkeypatch.setattr(cli, "_generate_once", fail)
    with pytest.raises(RuntimeError, match="some bug"):
        main(["generate", "--model", str(flux_true_cfg_folder), "--out", str(tmp_path / "x.png"), "--quiet"])


def _png(path):
    return np.asarray(Image.open(path))


def test_guidance_reaches_a_flux_model_without_guidance_embedding(flux_true_cfg_folder, tmp_path, capsys, caplog):
    """The default reference model's guidance is true CFG: --guidance 1 and 8 must differ."""
    pipe = cli.load_pipeline(flux_true_cfg_folder)
    assert cli.guidance_setting(pipe) == "true_cfg_scale"
    images = {}
    for g in ("1", "8"):
        out = tmp_path / f"g{g}.png"
        with caplog.at_level("INFO", logger="diffboost"):
            assert main(["generate", "--model", str(flux_true_cfg_folder), "--steps", "3", "--guidance", g,
                         "--preset", "none", "--out", str(out), "--quiet"]) == 0
        images[g] = _png(out)
    assert "--guidance sets true_cfg_scale" in caplog.text
    assert not np.array_equal(images["1"], images["8"])
    # the model's shipped setting (true_cfg_scale 3) is what runs without --guidance; --guidance 3 is the same
    for args, name in ((["--guidance", "3"], "g3.png"), ([], "default.png")):
        assert main(["generate", "--model", str(flux_true_cfg_folder), "--steps", "3", *args, "--preset", "none",
                     "--out", str(tmp_path / name), "--quiet"]) == 0
    np.testing.assert_array_equal(_png(tmp_path / "g3.png"), _png(tmp_path / "default.png"))


def test_guidance_setting_per_pipeline(flux_folder, caplog):
    assert cli.guidance_setting(make_flux(guidance_embeds=True)) == "guidance_scale"
    assert cli.guidance_setting(make_sd()) == "guidance_scale"
    assert cli.guidance_kwargs(make_flux(guidance_embeds=False), 4.0) == {"true_cfg_scale": 4.0, "negative_prompt": ""}

    class NoKnob:
        def __call__(self, prompt, num_inference_steps=1):
            pass

    knobless = NoKnob()
    with caplog.at_level("WARNING", logger="diffboost"):
        assert cli.guidance_kwargs(knobless, 4.0) == {} and cli.guidance_kwargs(knobless, 5.0) == {}
    assert caplog.text.count("has no guidance setting; --guidance 4 is ignored") == 1


def test_generate_preset_none_runs_the_plain_pipeline(flux_true_cfg_folder, tmp_path, capsys):
    out = tmp_path / "plain.png"
    assert main(["generate", "--model", str(flux_true_cfg_folder), "--steps", "3", "--preset", "none", "--compare",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "plugins: none (plain pipeline)" in text and "PSNR vs baseline: inf dB" in text
    assert Image.open(tmp_path / "plain_compare.png").size == (128, 64)


def test_generate_summary_counts_the_calls_of_any_plugin_kind(flux_true_cfg_folder, tmp_path, monkeypatch, capsys):
    """A preset of a step plugin (SADA) reports its denoiser calls like a cache does (typed stats with
    a common part), instead of raising KeyError or printing nothing."""
    from diffboost.plugins import presets

    monkeypatch.setitem(presets.PRESETS, "sada-only", lambda: [__import__("diffboost").SADA()])
    assert main(["generate", "--model", str(flux_true_cfg_folder), "--steps", "6", "--preset", "sada-only",
                 "--out", str(tmp_path / "s.png"), "--quiet"]) == 0
    text = capsys.readouterr().out
    # SADA's defaults skip nothing in 6 steps; true CFG runs two passes per step
    assert "plugins: SADA(" in text and "denoiser calls computed: 12/12 (" in text


def test_ctrl_c_in_a_real_run_ends_in_one_line(flux_true_cfg_folder, tmp_path):
    """SIGINT to a running `diffboost batch`: exit code 130, no traceback, the finished images and
    their manifest rows kept, no temporary file that looks like an image."""
    import signal
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffboost.cli", "batch", str(prompts), "--model", str(flux_true_cfg_folder),
         "--seeds", "400", "--steps", "20", "--preset", "none", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("*.png"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; finished files are kept" in err
    images = sorted(p.name for p in out.glob("*.png"))
    rows = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(images) >= 2 and set(rows) <= set(images) and len(images) - len(rows) <= 1


def test_bench_without_the_reference_package_says_what_to_install(tmp_path):
    """``pip install .`` alone has no diffboost-reference: generate works, bench ends in one line."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['diffboost_reference'] = None\n"  # as if it were not installed
            "from diffboost.cli import main; sys.exit(main(['bench', '--quick']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "diffboost bench: error: the bench needs the diffboost-reference package" in done.stderr
    assert "pip install ./reference" in done.stderr and "Traceback" not in done.stderr
