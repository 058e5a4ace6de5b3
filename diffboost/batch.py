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
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

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


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt entries of a text or ``.jsonl`` file: ``[{"prompt": ..., optional "seed"/"steps"}]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each JSON line needs a string 'prompt' key")
            unknown = set(entry) - {"prompt", "seed", "steps"}
            if unknown:
                raise ValueError(f"{path}:{number}: unknown keys {sorted(unknown)}; supported: prompt, seed, steps")
            for key in ("seed", "steps"):
                value = entry.get(key, 1)
                if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "steps" else 0):
                    raise ValueError(f"{path}:{number}: '{key}' must be a {'positive' if key == 'steps' else 'non-negative'} integer")
            entries.append(entry)
        else:
            entries.append({"prompt": text})
    if not entries:
        raise ValueError(f"prompt file {path} holds no prompts (one per line, or JSON Lines with a 'prompt' key)")
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


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``:
    a crash never leaves a truncated ``path`` behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished jobs by file name; a torn or foreign line is ignored (its job is made again)."""
    path = out_dir / MANIFEST
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["file"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def save_manifest(out_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records.values(), key=lambda r: r["file"]))
    write_atomic(out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def pending_jobs(jobs: list[BatchJob], out_dir: Path, records: dict[str, dict[str, Any]]) -> list[BatchJob]:
    """Jobs without both an image file and a manifest entry."""
    return [j for j in jobs if not (j.filename in records and (out_dir / j.filename).is_file())]


def run_batch(
    jobs: list[BatchJob],
    out_dir: str | Path,
    generate: Callable[[BatchJob], tuple[Any, float]],
    progress: bool = True,
) -> dict[str, Any]:
    """Make every pending job with ``generate(job) -> (PIL image, seconds)``; returns a summary.

    The image is renamed into place before its manifest entry is written, so a crash between the two
    only costs that image being made again.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_manifest(out_dir)
    todo = pending_jobs(jobs, out_dir, records)
    skipped = len(jobs) - len(todo)
    if skipped:
        logger.info("resuming: %d of %d images already in %s", skipped, len(jobs), out_dir)
    seconds = 0.0
    for job in tqdm(todo, desc="batch", disable=not progress):
        image, took = generate(job)
        write_atomic(out_dir / job.filename, image.save)
        records[job.filename] = {**asdict(job), "file": job.filename, "id": job.job_id, "seconds": round(took, 4),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_manifest(out_dir, records)
        seconds += took
    return {"made": len(todo), "skipped": skipped, "total": len(jobs), "seconds": seconds}
