"""Running ``diffboost batch`` on several processes and machines with ``torchrun``.

``torchrun --nproc-per-node N -m diffboost batch PROMPTS --out DIR`` starts N copies; each reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment torchrun sets, joins a
``torch.distributed`` process group (gloo on CPU, NCCL on GPUs, one GPU per rank:
``cuda:LOCAL_RANK``), makes the jobs whose index is congruent to its rank, and writes them into the
same folder (a filesystem every rank sees: local for one machine, shared such as NFS for several) with
the same atomic writes and manifest lock as one process. Every rank then sends its counts to rank 0,
which prints one summary. Multi-node: ``torchrun --nnodes M --node-rank R --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --nproc-per-node N -m diffboost batch ...`` on each machine.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("diffboost")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a ``torchrun`` launch (one process: ``rank 0 of 1``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, index: int) -> bool:
        """Whether this rank makes the job at ``index`` (round-robin over the whole job list, so that
        every rank agrees without talking, whatever is already done)."""
        return index % self.world == self.rank


def from_env(env: dict[str, str] | None = None) -> Ranks:
    """The ranks torchrun set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without them."""
    env = dict(os.environ if env is None else env)
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Ranks(rank, world, local)


def device_for(ranks: Ranks) -> str:
    """One device per rank: ``cuda:LOCAL_RANK`` where CUDA is available (and has that many GPUs), else CPU."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise ValueError(f"rank {ranks.rank} has LOCAL_RANK {ranks.local_rank} but this machine has {count} GPU(s); "
                             f"start at most {count} processes per node (--nproc-per-node)")
        return f"cuda:{ranks.local_rank}"
    return "cpu"


def init(ranks: Ranks, device: str, timeout_minutes: float = 30.0) -> None:
    """Join the process group torchrun prepared (no-op for one process)."""
    if not ranks.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.debug("rank %d of %d joined (%s, %s)", ranks.rank, ranks.world, backend, device)


def gather(ranks: Ranks, item: Any) -> list[Any]:
    """Every rank's ``item`` on every rank, in rank order (``[item]`` for one process)."""
    if not ranks.distributed:
        return [item]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, item)
    return out


def finish(ranks: Ranks) -> None:
    """Leave the process group (no-op for one process)."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
