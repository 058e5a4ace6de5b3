"""Writing files so that nothing finished is ever lost: atomic replace, normal permissions.

Used by the runtime (:func:`diffboost.save`) and by the command line (images, manifests).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

#: temporary files end with this suffix, so that globs for images never pick up a half-written one
PARTIAL_SUFFIX = ".tmp"


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``:
    a crash never leaves a truncated ``path`` behind. The temporary file is ``.NAME.XXXX.tmp`` (hidden,
    and no image suffix); the result gets the usual permissions (``0o666`` less the umask), not the
    temporary file's private ``0o600``. ``write`` must not infer the format from the file name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
