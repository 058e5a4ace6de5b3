"""Batch generation that never loses finished work: ``diffboost batch PROMPTS --out DIR``.

Every job (prompt, negative prompt, seed, steps, size, guidance, extra pipeline arguments, plugin
stack, model folder and dtype) gets a stable id, a hash of those settings; its image goes to
``DIR/<index>_<id>.png`` (videos: ``.mp4``, or animated ``.webp``/``.gif`` without ffmpeg, with a
``.json`` sidecar) through a temporary file and an atomic rename, carrying its settings
(:mod:`diffboost.media`), and ``DIR/manifest.jsonl`` (rewritten atomically after each output)
records what was made, how long it took, and which prompt-file rows could not be made and why.
Re-running the same command skips every job whose output and manifest entry exist and are intact, so
an interrupted run resumes where it stopped; a job whose settings changed gets a new id and is made
again, and the old output is left alone.

Prompt files (:mod:`diffboost.prompt_files`): ``.txt``, ``.jsonl`` or ``.csv`` with per-row settings;
a bad row is recorded in the manifest with its row number and the run goes on. Several runs on one
folder (two commands, or the ranks of ``torchrun``, :mod:`diffboost.distributed`) share the work
through file locks.
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
    negative_prompt: str | None = None
    #: height and width of a non-square output (``size`` is None then)
    height: int | None = None
    width: int | None = None
    #: the row's other pipeline arguments, as sorted JSON ("" for none)
    extra: str = ""
    #: the row of the prompt file the job comes from (0: not from a file)
    row: int = 0
    #: the output's file type: ``.png``, or a video type (:func:`diffboost.media.video_suffix`)
    suffix: str = ".png"

    @property
    def job_id(self) -> str:
        """Hash of the settings that decide the output (not of ``index``, ``row`` or ``suffix``). Jobs
        without the newer settings hash as they always did, so older folders resume."""
        key: list[Any] = [self.prompt, self.seed, self.steps, self.size, self.guidance, self.plugins, self.model,
                          self.dtype]
        newer = [self.negative_prompt, self.height, self.width, self.extra]
        if newer != [None, None, None, ""]:
            key += newer
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]

    @property
    def filename(self) -> str:
        return f"{self.index:05d}_{self.job_id}{self.suffix}"

    @property
    def group_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call (``--batch-size``)."""
        return (self.steps, self.size, self.height, self.width, self.guidance, self.extra,
                self.negative_prompt is None)

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline arguments of the row beyond prompt, steps, seed and guidance."""
        kwargs: dict[str, Any] = json.loads(self.extra) if self.extra else {}
        if self.size:
            kwargs["height"] = kwargs["width"] = self.size
        elif self.height:
            kwargs["height"], kwargs["width"] = self.height, self.width
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = self.negative_prompt
        return kwargs

    def settings(self) -> dict[str, Any]:
        """What the output is stored with (PNG text chunks, a video's sidecar)."""
        height = self.size or self.height
        width = self.size or self.width
        out: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                               "steps": self.steps, "height": height, "width": width, "guidance": self.guidance,
                               "model": self.model, "dtype": self.dtype, "plugins": self.plugins, "row": self.row}
        if self.extra:
            out["extra"] = json.loads(self.extra)
        return out


def read_prompts(path: str | Path, call_args: Any = None, native: int | None = None) -> list[dict[str, Any]]:
    """The rows of a prompt file (:func:`diffboost.prompt_files.read_rows`) as settings dicts with
    their ``row`` number; the first bad row raises :class:`InputError` (``path:row: what is wrong``).
    ``diffboost batch`` reads the rows itself and records bad ones instead."""
    from .prompt_files import read_rows

    entries = []
    for row in read_rows(path, call_args, native):
        if row.error is not None:
            raise InputError(row.error)
        entries.append({**row.settings, "row": row.number})
    return entries


def make_jobs(entries: list[dict[str, Any]], seeds: list[int], steps: int, **settings: Any) -> list[BatchJob]:
    """One job per entry and seed. An entry is a prompt-file row's settings (``prompt``, optional
    ``seed``, ``steps``, ``negative_prompt``, ``height``/``width``, ``guidance``, ``extra``, and ``row``,
    its row number); its own values replace ``seeds`` / ``steps`` / the shared ``settings`` (the
    other :class:`BatchJob` fields: size, guidance, plugins, model, dtype, suffix)."""
    jobs: list[BatchJob] = []
    for entry in entries:
        fields = dict(settings)
        if entry.get("guidance") is not None:
            fields["guidance"] = entry["guidance"]
        if entry.get("negative_prompt") is not None:
            fields["negative_prompt"] = entry["negative_prompt"]
        if "height" in entry:
            if entry["height"] == entry["width"]:
                fields.update(size=entry["height"], height=None, width=None)
            else:
                fields.update(size=None, height=entry["height"], width=entry["width"])
        if entry.get("extra"):
            fields["extra"] = json.dumps(entry["extra"], sort_keys=True)
        fields["row"] = entry.get("row", 0)
        for seed in [entry["seed"]] if "seed" in entry else seeds:
            jobs.append(BatchJob(len(jobs), entry["prompt"], seed, entry.get("steps", steps), **fields))
    return jobs


def save_image(image: Any, path: str | Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``image`` atomically in the format its suffix names (PNGs carry ``settings`` in text
    chunks); returns its size and SHA-256."""
    from .media import save_image as write

    write(image, path, settings)
    return file_digest(Path(path))


def save_output(output: Any, path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """An image (PNG with its settings) or a video (with a sidecar JSON); returns size and SHA-256."""
    from .media import save_video, video_frames

    if path.suffix.lower() == ".png":
        if settings.get("height") is None:  # the model's own size: record what was made
            settings = {**settings, "height": output.height, "width": output.width}
        return save_image(output, path, settings)
    if settings.get("height") is None:
        first = video_frames(output[:1])[0]
        settings = {**settings, "height": first.shape[0], "width": first.shape[1]}
    save_video(output, path, settings)
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
        self._by_id: dict[str, dict[str, Any]] | None = None

    def _current(self) -> tuple[int, int, int]:
        try:
            st = (self.out_dir / MANIFEST).stat()
        except FileNotFoundError:
            return (0, 0, -1)  # no manifest yet
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> dict[str, dict[str, Any]]:
        stamp = self._current()
        if stamp != self._stamp:
            self._records, self._stamp, self._by_id = load_manifest(self.out_dir), stamp, None
        return self._records

    def by_id(self) -> dict[str, dict[str, Any]]:
        """:func:`done_by_id` of the current records (computed once per version of the file)."""
        records = self.read()
        if self._by_id is None:
            self._by_id = done_by_id(records)
        return self._by_id

    def write(self, records: dict[str, dict[str, Any]]) -> None:
        save_manifest(self.out_dir, records)
        self._records, self._stamp, self._by_id = records, self._current(), None


def save_manifest(out_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records.values(), key=lambda r: r["file"]))
    write_atomic(out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def done_by_id(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Finished records by job id (the settings' hash), for jobs whose position in the prompt file moved."""
    return {r["id"]: r for r in records.values() if r.get("status", "done") == "done" and "id" in r}


def is_done(job: BatchJob, out_dir: Path, records: dict[str, dict[str, Any]],
            by_id: dict[str, dict[str, Any]] | None = None) -> bool:
    """The job's output exists, has a manifest entry and is intact: the size and SHA-256 the manifest
    recorded, or, for entries written before they were recorded, an image PIL can decode. With
    ``by_id`` (:func:`done_by_id`), an intact output of the same settings under another position's
    file name counts too (rows added or removed above it do not make it again)."""
    record = records.get(job.filename)
    if (record is None or not (out_dir / job.filename).is_file()) and by_id is not None:
        other = by_id.get(job.job_id)
        if other is not None and Path(other["file"]).suffix == job.suffix:
            record = other
    if record is None:
        return False
    path = out_dir / record["file"]
    if not path.is_file():
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
    """Jobs without an intact output and a manifest entry (see :func:`is_done`)."""
    by_id = done_by_id(records)
    return [j for j in jobs if not is_done(j, out_dir, records, by_id)]


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")
_JOB_FILE = re.compile(r"^\d{5,}_(?P<id>[0-9a-f]{10})\.(png|mp4|webp|gif)(\.json)?$")


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


ERROR_PREFIX = "error:"


def error_records(source: str, errors: list[tuple[int, str]]) -> dict[str, dict[str, Any]]:
    """Manifest records of prompt-file rows that cannot be made (``(row number, message)``)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {f"{ERROR_PREFIX}{source}:{row:06d}": {"file": f"{ERROR_PREFIX}{source}:{row:06d}", "status": "error",
                                                  "source": source, "row": row, "error": message, "finished": stamp}
            for row, message in errors}


def _many(generate: Callable[[BatchJob], tuple[Any, float]]) -> Callable[[list[BatchJob]], tuple[list[Any], float]]:
    def many(group: list[BatchJob]) -> tuple[list[Any], float]:
        outputs, seconds = [], 0.0
        for job in group:
            output, took = generate(job)
            outputs.append(output)
            seconds += took
        return outputs, seconds

    return many


def _groups(jobs: list[BatchJob], size: int) -> Iterator[list[BatchJob]]:
    """Consecutive runs of jobs that can share a pipeline call, at most ``size`` each."""
    group: list[BatchJob] = []
    for job in jobs:
        if group and (len(group) == size or job.group_key != group[0].group_key):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def run_batch(
    jobs: list[BatchJob],
    out_dir: str | Path,
    generate: Callable[[BatchJob], tuple[Any, float]] | None = None,
    progress: bool = True,
    *,
    generate_many: Callable[[list[BatchJob]], tuple[list[Any], float]] | None = None,
    batch_size: int = 1,
    errors: list[tuple[int, str]] | None = None,
    source: str = "",
    metadata: dict[str, Any] | None = None,
    ranks: Any = None,
) -> dict[str, Any]:
    """Make every pending job; returns a summary (``made``, ``skipped``, ``busy``, ``failed``,
    ``total``, ``seconds`` of generation, ``wall`` seconds, ``interrupted``).

    ``generate(job) -> (output, seconds)``, or ``generate_many(jobs) -> (outputs, seconds)`` for up to
    ``batch_size`` jobs that share steps, size, guidance and extra arguments (one pipeline call). An
    output is a PIL image or a video's frames. A job the pipeline refuses (``ValueError`` or
    ``TypeError``: a size it does not take, an argument value it rejects) is recorded in the manifest
    as an error with its row, and the run goes on; so are the prompt-file ``errors`` (``(row,
    message)`` of ``source``, written by rank 0). ``metadata`` is added to every output's settings
    (the plugin stack as data, diffboost's version). ``ranks`` (:class:`diffboost.distributed.Ranks`):
    this process makes only the jobs it owns. Ctrl-C stops after the output being written, keeping
    everything finished (``interrupted`` is then True).

    An output is renamed into place before its manifest entry is written, so a crash between the two
    only costs that output being made again. Safe with several runs on one folder (:class:`FolderLock`):
    the manifest is merged under a lock, and a job another run is making is left to it (``busy``).
    """
    from tqdm.auto import tqdm

    if generate_many is None:
        if generate is None:
            raise TypeError("run_batch needs generate or generate_many")
        generate_many = _many(generate)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank0 = ranks is None or ranks.rank == 0
    mine = [j for j in jobs if ranks is None or ranks.owns(j.index)]
    lock = FolderLock(out_dir)
    manifest = ManifestCache(out_dir)
    seconds, made, busy, failed, skipped, interrupted = 0.0, 0, 0, 0, 0, False

    def record(job: BatchJob, extra: dict[str, Any]) -> None:
        with lock.manifest():
            records = dict(manifest.read())
            records[extra.get("file", job.filename)] = {**asdict(job), "id": job.job_id, **extra,
                                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if extra.get("status") == "done":  # an earlier failure of the same job is over
                records.pop(ERROR_PREFIX + job.filename, None)
            manifest.write(records)

    def fail(job: BatchJob, err: Exception) -> None:
        """The pipeline refused the job: recorded with its row, the run goes on."""
        nonlocal failed
        failed += 1
        logger.warning("row %d (%s): %s", job.row, job.filename, err)
        record(job, {"file": f"{ERROR_PREFIX}{job.filename}", "status": "error", "source": source,
                     "error": f"{source or 'job'}:{job.row}: {err}"})
        bar.update(1)

    try:
        if rank0:
            remove_partial_files(out_dir, lock)
            if errors is not None and source:
                with lock.manifest():
                    records = {k: v for k, v in manifest.read().items()  # this file's old errors are replaced
                               if not (v.get("status") == "error" and v.get("source") == source)}
                    records.update(error_records(source, errors))
                    manifest.write(records)
        with lock.manifest():
            todo = pending_jobs(mine, out_dir, manifest.read())
        skipped = len(mine) - len(todo)
        if skipped:
            logger.info("resuming: %d of %d outputs already in %s", skipped, len(mine), out_dir)
        bar = tqdm(total=len(todo), desc="batch", disable=not (progress and rank0))
        try:
            for candidates in _groups(todo, batch_size):
                group: list[BatchJob] = []
                for job in candidates:
                    if not lock.claim(job.job_id):
                        busy += 1
                        bar.update(1)
                        continue
                    with lock.manifest():
                        finished = is_done(job, out_dir, manifest.read(), manifest.by_id())
                    if finished:  # another run made it since we looked
                        lock.release(job.job_id)
                        skipped += 1
                        bar.update(1)
                        continue
                    group.append(job)
                try:
                    if not group:
                        continue
                    try:
                        outputs, took = generate_many(group)
                        results = list(zip(group, outputs, [took / len(group)] * len(group)))
                    except (ValueError, TypeError) as err:
                        if len(group) == 1:
                            fail(group[0], err)
                            continue
                        results = []  # one call per job, to find the one the pipeline refuses
                        for job in group:
                            try:
                                (output,), took = generate_many([job])
                                results.append((job, output, took))
                            except (ValueError, TypeError) as job_err:
                                fail(job, job_err)
                    for job, output, took in results:
                        digest = save_output(output, out_dir / job.filename, {**job.settings(), **(metadata or {})})
                        record(job, {"file": job.filename, "status": "done", "seconds": round(took, 4), **digest})
                        seconds += took
                        made += 1
                        bar.update(1)
                finally:
                    for job in group:
                        lock.release(job.job_id)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    finally:
        lock.close()
    if busy:
        logger.info("%d output(s) were being made by another run on %s and were left to it", busy, out_dir)
    return {"made": made, "skipped": skipped, "busy": busy, "failed": failed, "total": len(mine),
            "seconds": seconds, "wall": time.perf_counter() - start, "interrupted": interrupted,
            "rank": 0 if ranks is None else ranks.rank}
