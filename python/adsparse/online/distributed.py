"""Data parallelism over processes for the online trainer (``--nproc N``).

Every rank holds full copies of every model and sees every mini-batch; it trains on its own
contiguous share of the rows and the gradients are summed across ranks, so after each step all
ranks hold the same parameters. Predictions are gathered, so every rank computes the same
metrics and therefore takes the same regeneration decisions. The pruning transition itself runs
on rank 0 and its result is broadcast, which makes the serving masks identical by construction
(and each regeneration checks it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adsparse.data.base import Batch

__all__ = ["DistContext", "mask_digest", "spawn"]


@dataclass
class DistContext:
    """Rank and world size of this process; ``world == 1`` makes every method a no-op."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch: Batch) -> Batch:
        """This rank's contiguous slice of the batch rows (slices differ by at most one row)."""
        if self.world == 1:
            return batch
        n = batch.labels.shape[0]
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return Batch(batch.dense[lo:hi], batch.sparse[lo:hi], batch.labels[lo:hi])

    def all_reduce_grads(self, model: nn.Module) -> None:
        """Sum gradients over ranks (each rank's loss is already divided by the global batch).

        One flat buffer per step instead of one collective per parameter: the MLPs have a dozen
        small tensors and a collective's latency dominates their size. A model that shards some
        parameters over the ranks lists the ones every rank holds whole in
        ``replicated_parameters()`` (``online/torchrec.py``); only those are summed, a shard's
        gradient already holds every rank's rows.
        """
        if self.world == 1:
            return
        params = (model.replicated_parameters() if hasattr(model, "replicated_parameters")
                  else model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``[S, b_r]`` tensor along dim 1, in rank order."""
        if self.world == 1:
            return local
        sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([local.shape[1]], device=local.device))
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(local.shape[0], width, dtype=local.dtype, device=local.device)
        padded[:, :local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:, :int(s.item())] for p, s in zip(parts, sizes)], dim=1)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; models travel on the CPU)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, digest: str, what: str) -> list[str]:
        """All ranks' digests of ``what``; raises if any rank differs from rank 0."""
        if self.world == 1:
            return [digest]
        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{what} differs across ranks: {digests}")
        return digests

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def mask_digest(model: nn.Module) -> str:
    """SHA-1 of every block-sparse index buffer of ``model`` (its serving masks)."""
    h = hashlib.sha1()
    for name, buf in model.named_buffers():
        if name.split(".")[-1] in ("row_offsets", "col_indices"):
            h.update(name.encode())
            h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable[..., Any],
            args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        fn(DistContext(rank, world), *args)
        # Every rank finished before any tears gloo down: a rank that destroys its group while
        # another still talks to it can abort that one ("terminate called without an active
        # exception", seen once in tests/test_nn_ddp.py). Not on an error: the others may never
        # arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(fn: Callable[..., Any], nproc: int, args: tuple = (), device: str = "cpu") -> None:
    """Run ``fn(DistContext, *args)`` in ``nproc`` processes (gloo on CPU, nccl on CUDA)."""
    if nproc == 1:
        fn(DistContext(), *args)
        return
    import torch.multiprocessing as mp

    backend = "nccl" if device.startswith("cuda") else "gloo"
    mp.spawn(_worker, args=(nproc, _free_port(), backend, fn, args), nprocs=nproc, join=True)
