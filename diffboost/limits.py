"""Checks on a user's generation settings and output paths, shared by the CLI, ``batch`` and the demo.

Every check runs before the model is loaded and raises :class:`InputError` (a ``ValueError``)
whose message names the setting, the value and what is allowed, so that a bad command line fails in
milliseconds instead of after minutes of work (or with a traceback from deep inside torch).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

#: seeds are ``torch.Generator.manual_seed`` values: ``0 <= seed < 2**63``
SEED_LIMIT = 2**63
#: denoising steps per image
MAX_STEPS = 1000
#: image side in pixels: at most ``SIZE_FACTOR`` x the model's own size, never above ``MAX_SIZE``
MAX_SIZE = 4096
SIZE_FACTOR = 8
MIN_SIZE = 16
#: images per prompt in one ``batch`` run (``--seeds``)
MAX_SEEDS = 100_000
#: guidance scales above this are refused (the images are saturated long before)
MAX_GUIDANCE = 100.0
#: image formats an output file may have (its suffix), and PIL's name for each
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class InputError(ValueError):
    """A user setting or path that cannot work; the message says what is allowed."""


def check_seed(seed: object, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{what} must be an integer, got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise InputError(f"{what} {seed} is out of range; allowed: 0 <= {what} < 2**63 ({SEED_LIMIT - 1} at most)")
    return seed


def check_seed_range(first: int, count: int) -> None:
    """``count`` seeds starting at ``first`` (``batch --seed --seeds``)."""
    check_seed(first)
    if not 1 <= count <= MAX_SEEDS:
        raise InputError(f"--seeds {count} is out of range; allowed: 1 to {MAX_SEEDS} images per prompt")
    if first + count > SEED_LIMIT:
        raise InputError(f"seeds {first}..{first + count - 1} go past the largest seed 2**63 - 1; lower --seed")


def _check_count(value: object, what: str, most: int) -> int:
    """An integer from 1 to ``most`` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {value!r}")
    if not 1 <= value <= most:
        raise InputError(f"{what} {value} is out of range; allowed: 1 to {most}")
    return value


def check_steps(steps: object, what: str = "steps") -> int:
    return _check_count(steps, what, MAX_STEPS)


def size_limit(native: int | None) -> int:
    """The largest image side accepted for a model whose own size is ``native`` pixels (None: unknown)."""
    if not native:
        return MAX_SIZE
    return min(MAX_SIZE, max(1024, SIZE_FACTOR * native))


def check_size(size: object, native: int | None = None, what: str = "size") -> int:
    """Image side in pixels: a multiple of 8 (every Diffusers VAE), from ``MIN_SIZE`` to :func:`size_limit`."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InputError(f"{what} must be an integer number of pixels, got {size!r}")
    hi = size_limit(native)
    if not MIN_SIZE <= size <= hi:
        model = f" for a model made for {native} px" if native else ""
        raise InputError(f"{what} {size} px is out of range{model}; allowed: {MIN_SIZE} to {hi} px")
    if size % 8:
        raise InputError(f"{what} {size} px is not a multiple of 8 (the VAE's downsampling); try {size // 8 * 8 or 8}")
    return size


def check_guidance(value: object, what: str = "guidance") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value}; allowed: 0 to {MAX_GUIDANCE:g}")
    if not 0 <= value <= MAX_GUIDANCE:
        raise InputError(f"{what} {value:g} is out of range; allowed: 0 to {MAX_GUIDANCE:g}")
    return float(value)


def image_format(path: str | Path) -> str:
    """PIL's format name for an output file, from its suffix (a path without one is refused)."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise InputError(
            f"output {path}: unsupported image file type {suffix or '(no suffix)'!r}; use one of {sorted(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def _check_writable_folder(folder: Path, what: str) -> None:
    """``folder`` (created if missing) is a folder this process can create files in."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what}: {parent} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".diffboost-write-test.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise InputError(f"{what}: cannot create files in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """An image file that can be written: not a folder, a known image suffix, a writable parent."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give an image file name such as {path / 'image.png'}")
    image_format(path)
    _check_writable_folder(path.parent if str(path.parent) else Path("."), f"{what} {path}")
    return path


def check_stack_file(path: str | Path, what: str = "--out") -> Path:
    """A plugin stack file that can be written: ``.toml`` or ``.json``, not a folder, a writable parent."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name such as {path / 'stack.toml'}")
    if path.suffix.lower() not in (".toml", ".json"):
        raise InputError(f"{what} {path}: a stack file ends in .toml or .json")
    _check_writable_folder(path.parent if str(path.parent) else Path("."), f"{what} {path}")
    return path


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """A folder that can hold outputs: an existing folder or a new one, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file; give a folder")
    _check_writable_folder(path, f"{what} {path}")
    return path


#: frames per generated clip
MAX_FRAMES = 1024


def check_frames(frames: object, what: str = "frames") -> int:
    """Frames per video clip: 1 to :data:`MAX_FRAMES` (the pipeline rounds to what its VAE needs)."""
    return _check_count(frames, what, MAX_FRAMES)
