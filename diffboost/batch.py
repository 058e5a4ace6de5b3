"""Batch generation that never loses finished work: ``diffboost batch PROMPTS --out DIR``.

Every job (prompt, seed, steps, size, guidance, plugin stack, model folder and dtype) gets a stable
id, a hash of those settings; its image goes to ``DIR/<index>_<id>.png`` through a temporary file
and an atomic rename, and ``DIR/manifest.jsonl`` (rewritten atomically after each image) records what was made and how
long it took. Re-running the same command skips every job whose image and manifest entry exist, so
an interrupted run resumes where it stopped; a job whose settings changed gets a new id and is made
again, and the old image is left alone.

Prompt files: plain text, one prompt per line (blank lines and lines starting with ``#`` skipped),
or JSON Lines (``.jsonl``) with a ``prompt`` key and optional ``seed`` / ``steps`` per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .files import PARTIAL_SUFFIX, umask, write_atomic
from .limits import InputError, check_seed, check_steps

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class BatchJob:
    """One image to make. ``index``: position in the prompt file (after expanding seeds)."""

    index: int
    prompt: str
    seed: int
    steps: int
    size: int | None
    guidance: float | None
    plugins: str
    model: str = ""
    dtype: str = "float32"

    @property
    def job_id(self) -> str:
        """Hash of the settings that decide the image (not of ``index``)."""
        key = json.dumps([self.prompt, self.seed, self.steps, self.size, self.guidance, self.plugins, self.model,
                          self.dtype])
        return hashlib.sha256(key.encode()).hexdigest()[:10]

    @property
    def filename(self) -> str:
        return f"{self.index:05d}_{self.job_id}.png"


def _lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file; a line that is not UTF-8 is an error naming it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"prompt file {path}: cannot read it ({err.strerror or err})") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                "save the prompt file as UTF-8"
            ) from None
        lines.append((number, text.lstrip("\ufeff") if number == 1 else text))
    return lines


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt entries of a text or ``.jsonl`` file: ``[{"prompt": ..., optional "seed"/"steps"}]``.

    Every line is checked before any work (``path:line: what is wrong``): UTF-8, valid JSON, known
    keys, ``0 <= seed < 2**63``, ``1 <= steps <= 1000``.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompt file {path} is a folder; give a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    entries: list[dict[str, Any]] = []
    for number, line in _lines(path):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
                raise InputError(f"{path}:{number}: each JSON line needs a non-empty string 'prompt' key")
            unknown = set(entry) - {"prompt", "seed", "steps"}
            if unknown:
                raise InputError(f"{path}:{number}: unknown keys {sorted(unknown)}; supported: prompt, seed, steps")
            if "seed" in entry:
                check_seed(entry["seed"], what=f"{path}:{number}: 'seed'")
            if "steps" in entry:
                check_steps(entry["steps"], what=f"{path}:{number}: 'steps'")
            entries.append(entry)
        else:
            entries.append({"prompt": text})
    if not entries:
        raise InputError(f"prompt file {path} holds no prompts (one per line, or JSON Lines with a 'prompt' key)")
    return entries


def make_jobs(entries: list[dict[str, Any]], seeds: list[int], steps: int, **settings: Any) -> list[BatchJob]:
    """One job per entry and seed (an entry's own ``seed`` / ``steps`` replace ``seeds`` / ``steps``);
    ``settings``: the other :class:`BatchJob` fields, the same for every job (size, guidance, plugins,
    model, dtype)."""
    jobs: list[BatchJob] = []
    for entry in entries:
        for seed in [entry["seed"]] if "seed" in entry else seeds:
            jobs.append(BatchJob(len(jobs), entry["prompt"], seed, entry.get("steps", steps), **settings))
    return jobs


def save_image(image: Any, path: str | Path) -> dict[str, Any]:
    """Write ``image`` atomically in the format its suffix names; returns its size and SHA-256."""
    from .limits import image_format

    path = Path(path)
    fmt = image_format(path)
    write_atomic(path, lambda tmp: image.save(tmp, format=fmt))
    return file_digest(path)


def file_digest(path: Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class FolderLock:
    """Two ``batch`` runs on one folder, in one or several processes, never lose or redo work.

    POSIX record locks on ``DIR/.diffboost.lock`` (released by the kernel when a process dies, so a
    killed run leaves no stale lock): byte 0 guards the manifest (read, merge, rewrite), and one byte
    per job id claims the job while it is being made, so a second run skips it instead of making it
    twice. Where ``fcntl`` is missing (Windows) the manifest lock uses ``msvcrt`` and claims always
    succeed (two runs may then make the same image twice, but lose nothing).
    """

    FILE = ".diffboost.lock"

    def __init__(self, out_dir: Path):
        self.fd = os.open(out_dir / self.FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            import fcntl

            self._fcntl: Any = fcntl
        except ImportError:  # pragma: no cover - Windows
            self._fcntl = None

    @staticmethod
    def _offset(job_id: str) -> int:
        return 1 + int(job_id, 16)

    def _lock(self, offset: int, blocking: bool) -> bool:
        if self._fcntl is None:  # pragma: no cover - Windows
            if offset:
                return True
            import msvcrt

            os.lseek(self.fd, 0, os.SEEK_SET)
            msvcrt.locking(self.fd, msvcrt.LK_LOCK, 1)
            return True
        flags = self._fcntl.LOCK_EX | (0 if blocking else self._fcntl.LOCK_NB)
        try:
            self._fcntl.lockf(self.fd, flags, 1, offset, os.SEEK_SET)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _unlock(self, offset: int) -> None:
        if self._fcntl is None:  # pragma: no cover - Windows
            if not offset:
                import msvcrt

                os.lseek(self.fd, 0, os.SEEK_SET)
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
            return
        self._fcntl.lockf(self.fd, self._fcntl.LOCK_UN, 1, offset, os.SEEK_SET)

    def manifest(self) -> Any:
        """Context manager: exclusive use of the manifest (blocks while another run writes it)."""
        import contextlib

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            self._lock(0, blocking=True)
            try:
                yield
            finally:
                self._unlock(0)

        return held()

    def claim(self, job_id: str) -> bool:
        """Claim a job; False when another live run is making it now."""
        return self._lock(self._offset(job_id), blocking=False)

    def release(self, job_id: str) -> None:
        self._unlock(self._offset(job_id))

    def close(self) -> None:
        os.close(self.fd)


def load_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished jobs by file name; a torn or foreign line is ignored (its job is made again)."""
    path = out_dir / MANIFEST
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                done[record["file"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


class ManifestCache:
    """The manifest's records, parsed again only when the file changed (another run replaced it):
    a batch of N images reads it O(N) times under the lock, not O(N) parses of N lines each."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._stamp: tuple[int, int, int] | None = None  # None: never read
        self._records: dict[str, dict[str, Any]] = {}

    def _current(self) -> tuple[int, int, int]:
        try:
            st = (self.out_dir / MANIFEST).stat()
        except FileNotFoundError:
            return (0, 0, -1)  # no manifest yet
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> dict[str, dict[str, Any]]:
        stamp = self._current()
        if stamp != self._stamp:
            self._records, self._stamp = load_manifest(self.out_dir), stamp
        return self._records

    def write(self, records: dict[str, dict[str, Any]]) -> None:
        save_manifest(self.out_dir, records)
        self._records, self._stamp = records, self._current()


def save_manifest(out_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records.values(), key=lambda r: r["file"]))
    write_atomic(out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def is_done(job: BatchJob, out_dir: Path, records: dict[str, dict[str, Any]]) -> bool:
    """The job's image exists, has a manifest entry and is intact: the size and SHA-256 the manifest
    recorded, or, for entries written before they were recorded, an image PIL can decode."""
    record = records.get(job.filename)
    path = out_dir / job.filename
    if record is None or not path.is_file():
        return False
    if "sha256" in record:
        if path.stat().st_size != record.get("bytes"):
            return False
        return file_digest(path)["sha256"] == record["sha256"]
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception:  # truncated or not an image: make it again
        return False
    return True


def pending_jobs(jobs: list[BatchJob], out_dir: Path, records: dict[str, dict[str, Any]]) -> list[BatchJob]:
    """Jobs without an intact image and a manifest entry (see :func:`is_done`)."""
    return [j for j in jobs if not is_done(j, out_dir, records)]


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")
_JOB_FILE = re.compile(r"^\d{5,}_(?P<id>[0-9a-f]{10})\.png$")


def remove_partial_files(out_dir: Path, lock: FolderLock) -> int:
    """Delete temporary files left by killed writes; never one that a live run is writing (its job,
    or the manifest, is locked). Returns how many were deleted."""
    removed = 0
    for tmp in out_dir.glob(".*" + PARTIAL_SUFFIX):
        match = _PARTIAL.match(tmp.name)
        if not match:
            continue
        name = match["name"]
        if name == MANIFEST:
            with lock.manifest():
                tmp.unlink(missing_ok=True)
                removed += 1
            continue
        job = _JOB_FILE.match(name)
        if job and lock.claim(job["id"]):
            try:
                tmp.unlink(missing_ok=True)
                removed += 1
            finally:
                lock.release(job["id"])
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted run in %s", removed, out_dir)
    return removed


def run_batch(
    jobs: list[BatchJob],
    out_dir: str | Path,
    generate: Callable[[BatchJob], tuple[Any, float]],
    progress: bool = True,
) -> dict[str, Any]:
    """Make every pending job with ``generate(job) -> (PIL image, seconds)``; returns a summary.

    The image is renamed into place before its manifest entry is written, so a crash between the two
    only costs that image being made again. Safe with several runs on one folder (:class:`FolderLock`):
    the manifest is merged under a lock, and a job another run is making is left to it (counted as
    ``busy``).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out_dir)
    manifest = ManifestCache(out_dir)
    try:
        remove_partial_files(out_dir, lock)
        with lock.manifest():
            todo = pending_jobs(jobs, out_dir, manifest.read())
        skipped = len(jobs) - len(todo)
        if skipped:
            logger.info("resuming: %d of %d images already in %s", skipped, len(jobs), out_dir)
        seconds, made, busy = 0.0, 0, 0
        for job in tqdm(todo, desc="batch", disable=not progress):
            if not lock.claim(job.job_id):
                busy += 1
                continue
            try:
                with lock.manifest():
                    finished = is_done(job, out_dir, manifest.read())
                if finished:  # another run made it since we looked
                    skipped += 1
                    continue
                image, took = generate(job)
                digest = save_image(image, out_dir / job.filename)
                record = {**asdict(job), "file": job.filename, "id": job.job_id, "seconds": round(took, 4),
                          **digest, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                with lock.manifest():
                    records = dict(manifest.read())
                    records[job.filename] = record
                    manifest.write(records)
                seconds += took
                made += 1
            finally:
                lock.release(job.job_id)
    finally:
        lock.close()
    if busy:
        logger.info("%d image(s) were being made by another run on %s and were left to it", busy, out_dir)
    return {"made": made, "skipped": skipped, "busy": busy, "total": len(jobs), "seconds": seconds}
