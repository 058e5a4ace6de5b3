"""Teacher pairs (noise, final latent, text conditioning), generated in shards that survive a crash.

Sample ``i`` uses prompt ``prompts[i % len(prompts)]`` and noise drawn from a generator seeded with
``(seed, shard)``: a shard written once is the same whoever writes it, and a rerun skips the shards
already on disk (each is written atomically, so a killed run leaves whole shards or none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..files import write_atomic, write_text_atomic
from .teachers import Teacher

logger = logging.getLogger("diffboost")


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"pairs-{index:05d}.safetensors"


def generate_pairs(teacher: Teacher, prompts: list[str], folder: str | Path, *, count: int, shard_size: int,
                   batch: int, steps: int, seed: int, progress: Callable[[int], None] | None = None,
                   source: str = "") -> list[Path]:
    """Write ``count`` pairs into ``folder`` (shards of ``shard_size``), skipping shards already there.

    ``folder/pairs.json`` records what the shards depend on (``source``: the teacher, its steps and
    call settings, the seed, the shard size, a hash of the prompts); a folder made with other
    settings is refused, so several runs (reflow, then DMD) can share one folder safely."""
    if not prompts:
        raise ValueError("distillation needs at least one prompt")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"source": source, "teacher_steps": steps, "seed": seed, "shard_size": shard_size,
              "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    manifest = folder / "pairs.json"
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if made != recipe:
            differ = sorted(k for k in recipe if made.get(k) != recipe[k])
            raise ValueError(f"the pairs in {folder} were made with other settings ({', '.join(differ)}); "
                             "use another pairs folder")
    else:
        write_text_atomic(manifest, json.dumps(recipe, indent=1))
    shards = []
    for index in range((count + shard_size - 1) // shard_size):
        path = shard_path(folder, index)
        first = index * shard_size
        n = min(shard_size, count - first)
        shards.append(path)
        if path.is_file():
            if progress:
                progress(n)
            continue
        started = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        noise = teacher.noise(n, g)
        texts = [prompts[(first + i) % len(prompts)] for i in range(n)]
        x0, conds = [], []
        for lo in range(0, n, batch):
            part = texts[lo:lo + batch]
            with torch.no_grad():
                x0.append(teacher.sample(part, noise[lo:lo + batch], steps))
                conds.append(teacher.encode(part))
            if progress:
                progress(len(part))
        tensors = {"noise": noise.contiguous(), "x0": torch.cat(x0).contiguous()}
        for key in conds[0]:
            tensors[key] = torch.cat([c[key] for c in conds]).contiguous()
        meta = {"first": str(first), "prompts": json.dumps(texts), "seconds": f"{time.perf_counter() - started:.3f}"}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return shards


def load_pairs(shards: list[Path]) -> dict[str, Any]:
    """All shards in memory: ``noise``, ``x0`` and the conditioning tensors, plus ``prompts`` and
    ``seconds`` (the teacher time that made them, summed over the shards)."""
    parts = [load_file(str(p)) for p in shards]
    out: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    from safetensors import safe_open

    prompts: list[str] = []
    seconds = 0.0
    for p in shards:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
        prompts += json.loads(meta["prompts"])
        seconds += float(meta.get("seconds", 0.0))
    out["prompts"] = prompts
    out["seconds"] = seconds
    return out
