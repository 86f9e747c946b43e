"""The sweep's runs split across the processes of ``torchrun`` (torch.distributed: gloo on CPU, NCCL on GPU).

Each rank runs the model itself and trains its share of the runs from its own stream (the ``--distribute_modules``
idea of EleutherAI's sparsify: the SAEs, not the data, are split across ranks); ranks meet at barriers between the
stages, and rank 0 alone writes what is shared (sweep.json, the table, the heatmaps). Without torchrun (no
``WORLD_SIZE`` in the environment) there is one rank and no process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items: every ``world``-th, from position ``rank`` (the same split on every rank)."""
        return items[self.rank::self.world]

    def device(self, configured: str) -> str:
        """The device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        if self.world > 1 and configured == "cuda":
            return f"cuda:{self.local_rank}"
        return configured

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, ok: bool, message: str) -> None:
        """Raise on every rank when any rank failed a step (so no rank waits forever at the next barrier)."""
        if self.world == 1:
            if not ok:
                raise RuntimeError(message)
            return
        import torch
        import torch.distributed as dist

        on = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([0 if ok else 1], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise RuntimeError(message)


def world_from_environment() -> Ranks:
    """The rank, world size and local rank torchrun sets (one rank without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(ranks: Ranks, device: str):
    """The default process group for the block when there is more than one rank: NCCL for CUDA, gloo otherwise."""
    if ranks.world == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(device.split(":")[1]))
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
