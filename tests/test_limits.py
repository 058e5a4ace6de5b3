"""diffboost.limits: every user setting and output path is checked with a message naming it."""

import math
import os

import pytest

from diffboost.limits import (
    MAX_SEEDS,
    MAX_SIZE,
    InputError,
    check_guidance,
    check_output_dir,
    check_output_file,
    check_seed,
    check_seed_range,
    check_size,
    check_steps,
    image_format,
    size_limit,
)


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1])
def test_seeds_torch_accepts_pass(seed):
    import torch

    assert check_seed(seed) == seed
    torch.Generator().manual_seed(seed)  # the whole range is one torch takes


@pytest.mark.parametrize("seed, needle", [
    (-1, "seed -1 is out of range; allowed: 0 <= seed < 2**63"),
    (2**63, "seed 9223372036854775808 is out of range"),
    (2**64, "seed 18446744073709551616 is out of range"),
    (1.0, "seed must be an integer"),
    (True, "seed must be an integer"),
    ("3", "seed must be an integer"),
])
def test_bad_seeds_are_named(seed, needle):
    with pytest.raises(InputError) as err:
        check_seed(seed)
    assert needle in str(err.value)


def test_seed_ranges():
    check_seed_range(0, MAX_SEEDS)
    check_seed_range(2**63 - 10, 10)
    with pytest.raises(InputError, match="--seeds 300000000 is out of range; allowed: 1 to 100000"):
        check_seed_range(0, 300_000_000)
    with pytest.raises(InputError, match="go past the largest seed"):
        check_seed_range(2**63 - 10, 11)
    with pytest.raises(InputError, match="--seeds 0 is out of range"):
        check_seed_range(0, 0)


def test_steps():
    assert check_steps(1) == 1 and check_steps(1000) == 1000
    for bad, needle in [(0, "steps 0 is out of range; allowed: 1 to 1000"), (1001, "1001 is out of range"),
                        (2.0, "must be an integer"), (False, "must be an integer")]:
        with pytest.raises(InputError, match=needle):
            check_steps(bad)


def test_sizes_depend_on_the_model():
    assert size_limit(None) == MAX_SIZE == 4096
    assert size_limit(64) == 1024 and size_limit(256) == 2048 and size_limit(1024) == 4096
    assert check_size(64, 64) == 64 and check_size(1024, 64) == 1024 and check_size(16) == 16
    for size, native, needle in [
        (100_000, 64, "size 100000 px is out of range for a model made for 64 px; allowed: 16 to 1024 px"),
        (100_000, None, "allowed: 16 to 4096 px"),
        (8, 64, "size 8 px is out of range"),
        (1032, 64, "out of range"),
        (100, 64, "100 px is not a multiple of 8 (the VAE's downsampling); try 96"),
        (64.0, 64, "must be an integer number of pixels"),
    ]:
        with pytest.raises(InputError) as err:
            check_size(size, native)
        assert needle in str(err.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_guidance_is_refused(value):
    with pytest.raises(InputError, match="guidance must be a finite number"):
        check_guidance(value)


def test_guidance_range():
    assert check_guidance(0) == 0.0 and check_guidance(7.5) == 7.5 and check_guidance(100) == 100.0
    with pytest.raises(InputError, match="guidance -1 is out of range; allowed: 0 to 100"):
        check_guidance(-1)
    with pytest.raises(InputError, match="guidance 101 is out of range"):
        check_guidance(101)
    with pytest.raises(InputError, match="must be a number"):
        check_guidance("7")


def test_image_formats():
    assert image_format("a.png") == "PNG" and image_format("a.JPG") == "JPEG" and image_format("a.webp") == "WEBP"
    with pytest.raises(InputError, match=r"unsupported image file type '.gif'; use one of \['.jpeg', '.jpg', '.png', '.webp'\]"):
        image_format("a.gif")
    with pytest.raises(InputError, match=r"'\(no suffix\)'"):
        image_format("image")


def test_output_file_checks(tmp_path):
    assert check_output_file(tmp_path / "new" / "deeper" / "x.png") == tmp_path / "new" / "deeper" / "x.png"
    assert (tmp_path / "new" / "deeper").is_dir()
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == [], "the write test left a file"
    with pytest.raises(InputError, match="is a folder; give an image file name such as"):
        check_output_file(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        check_output_file(tmp_path / "file" / "sub" / "x.png")


def _unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; /proc refuses everyone
        return "/proc/diffboost-test"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def test_unwritable_outputs_are_refused(tmp_path):
    folder = _unwritable_folder(tmp_path)
    with pytest.raises(InputError, match="cannot create files in"):
        check_output_file(f"{folder}/x.png")
    with pytest.raises(InputError, match="cannot create files in"):
        check_output_dir(f"{folder}/batch")


def test_output_dir_checks(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file; give a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "out")
