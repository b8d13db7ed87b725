"""BlockSparseLinear under DistributedDataParallel (gloo, 2 CPU processes)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adsparse.nn import sparsify_

STEPS, GLOBAL_BATCH = 4, 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(21, 40), nn.ReLU(), nn.Linear(40, 1))
    return sparsify_(net, density=0.5, block_size=(8, 8))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 21, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g))
            for _ in range(STEPS)]


def _train(model: nn.Module, batches, rank: int = 0, world: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    share = GLOBAL_BATCH // world
    for x, y in batches:
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        _train(ddp, _data(), rank, world)
        torch.save(ddp.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still uses it (it can abort)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = _model()
    _train(single, _data())
    initial = _model().state_dict()
    for key, value in single.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(rank0["0.values"], initial["0.values"]), "training changed nothing"
