"""The package as a user installs it: a built wheel (``pip install .``, not editable) carries the
default model and generates from any folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject(folder: Path = ROOT):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((folder / "pyproject.toml").read_text())


def _packages_in(folder: Path, top: str) -> set[str]:
    return {".".join(p.parent.relative_to(folder).parts) for p in (folder / top).rglob("__init__.py")}


def test_every_subpackage_is_listed_for_the_wheel():
    assert _packages_in(ROOT, "diffboost") | {"diffboost.assets"} == set(_pyproject()["tool"]["setuptools"]["packages"])
    # the reference models' package is its own distribution, in reference/
    reference = _pyproject(ROOT / "reference")
    assert reference["project"]["name"] == "diffboost-reference" and "diffboost" in reference["project"]["dependencies"]
    found = _packages_in(ROOT / "reference", "diffboost_reference")
    assert len(found) >= 4 and found == set(reference["tool"]["setuptools"]["packages"])
    assert not (ROOT / "diffboost_reference").exists()


def _source_copy(dest: Path) -> Path:
    """The files a clean checkout has (tracked and new, not ignored), without build leftovers."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git to list the source files")
    for name in names:
        src = ROOT / name
        if src.is_file() and not name.startswith(("runs/", "out/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_a_non_editable_install_generates_from_any_folder(tmp_path):
    src = _source_copy(tmp_path / "src")
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    import importlib.util

    # build with the installed setuptools when there is one (no index needed), else in pip's isolated env
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(dist), str(src)], check=True, capture_output=True)
    (wheel,) = dist.glob("diffboost-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("diffboost_reference")]  # its own distribution
    assert "diffboost/assets/flux-shapes/transformer/diffusion_pytorch_model.safetensors" in names
    assert {"diffboost/presets/safe.toml", "diffboost/presets/fast.toml", "diffboost/presets/turbo.toml"} <= set(names)
    assert not [n for n in names if "sd-shapes" in n or "flux-shapes-128" in n or "/training_runs/" in n]
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere.mkdir()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import diffboost, diffboost.cli as cli; "
        "assert diffboost.__file__.startswith(sys.argv[1]), diffboost.__file__; "
        "assert str(cli.default_model_path()).startswith(sys.argv[1]), cli.default_model_path(); "
        "sys.exit(cli.main(['generate', '--steps', '3', '--out', 'img.png', '--quiet']))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFBOOST_ASSETS", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-c", code, str(site)], cwd=elsewhere, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diffboost/assets/flux-shapes" in result.stdout and (elsewhere / "img.png").is_file()


@pytest.mark.slow
def test_the_reference_package_installs_on_its_own(tmp_path):
    """``pip install ./reference``: a wheel holding only ``diffboost_reference``; with diffboost next
    to it the scene generator and the evaluator import from any folder."""
    src = _source_copy(tmp_path / "src")
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    import importlib.util

    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(dist), str(src / "reference")], check=True,
                   capture_output=True)
    (wheel,) = dist.glob("diffboost_reference-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if not n.startswith("diffboost_reference-")]  # minus the .dist-info
    assert code and all(n.startswith("diffboost_reference/") for n in code)
    assert "diffboost_reference/training/train_flux.py" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import diffboost_reference as r; "
            "from diffboost_reference.data.scenes import benchmark_prompts; "
            "from diffboost_reference.evaluation.classifier import AttributeClassifier; "
            "assert r.__file__.startswith(sys.argv[1]), r.__file__; print(len(benchmark_prompts(4)))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "4"
