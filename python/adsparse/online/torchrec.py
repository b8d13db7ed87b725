"""The online trainer on TorchRec: sharded embedding tables, data-parallel MLPs.

``adsparse run --model torchrec``: every model of the run (the dense one, each sparse one) is
TorchRec's ``DLRM`` under its ``DistributedModelParallel`` (DMP): the embedding tables are
placed whole on the ranks, round robin (table-wise sharding: each table lives on one rank and
serves every rank's lookups through all-to-all), and the MLPs are replicated. Gradients: every
rank's loss is already divided by the global batch (``strategies.train_step``), so gradients are
*summed* over ranks. A table's gradient gets every rank's rows through TorchRec's backward
all-to-all, which by default also divides by the world size (DDP's averaging); the placement
turns that division off (``comm_ops.set_gradient_division(False)``, a TorchRec-wide switch of
the process). The replicated parameters, listed by :meth:`ShardedModel.replicated_parameters`,
are summed by :meth:`adsparse.online.distributed.DistContext.all_reduce_grads` (DMP's own DDP
wrapper is off, it would average).

Regeneration (docs/online.md, "TorchRec"): :meth:`TorchRecPlacement.gather` assembles a local,
unsharded copy of the dense model and of its Adam state on every rank (one all-reduce per
table); rank 0 prunes, sparsifies and distills that copy exactly as for the project's DLRM and
broadcasts it; every rank then shards the new model with :meth:`TorchRecPlacement.distribute`,
so a sparse model has its own sharded tables (a copy of the dense model's at the transition) and
the same MLP masks on every rank. The copy needs the tables to fit on one host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection
from torchrec.distributed import comm_ops
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from adsparse.nn import BlockSparseLinear, load_sparse_state_dict, sparsify_
from adsparse.online.components import Components, block_pruner
from adsparse.online.distributed import DistContext
from adsparse.online.regeneration import block_masks, make_optimizer

__all__ = ["ShardedModel", "TorchRecPlacement", "full_state_dict", "preset_torchrec_components",
           "torchrec_components"]


class ShardedModel(DistributedModelParallel):
    """A DMP that names the parameters every rank holds whole (the MLPs)."""

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(module, init_data_parallel=False, **kwargs)
        self.sharded_names = frozenset(k for k, v in self.state_dict().items()
                                       if isinstance(v, ShardedTensor))

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """The wrapped model's modules under its own names (as DMP names parameters), so masks
        and reports name a layer the same in the local and the sharded model."""
        yield from self.module.named_modules(memo, prefix, remove_duplicate)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients the ranks must sum (all but the tables' shards)."""
        return [p for n, p in self.named_parameters() if n not in self.sharded_names]


def _local_shard(value: ShardedTensor) -> tuple[torch.Tensor, tuple[slice, ...]] | None:
    """This rank's part of a table and where it sits in the whole one (None: not here)."""
    shards = value.local_shards()
    if not shards:
        return None
    if len(shards) != 1:
        raise ValueError("a table split into several shards on one rank is not supported")
    meta = shards[0].metadata
    where = tuple(slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes))
    return shards[0].tensor, where


def _assemble(value: ShardedTensor, part: torch.Tensor | None) -> torch.Tensor:
    """The whole tensor of which this rank holds ``part`` (collective: every rank calls it)."""
    whole = torch.zeros(value.size(), dtype=value.dtype)
    located = _local_shard(value)
    if located is not None and part is not None:
        whole[located[1]] = part.detach().cpu()
    dist.all_reduce(whole)  # shards do not overlap: the sum puts each in its place
    return whole


def full_state_dict(model: ShardedModel) -> dict[str, torch.Tensor]:
    """``model``'s state with every table whole, on the CPU (collective)."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            located = _local_shard(value)
            out[key] = _assemble(value, None if located is None else located[0])
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
        else:
            out[key] = value  # a module's extra state (a block-sparse layer's settings)
    return out


class TorchRecPlacement:
    """Builds the trainable (sharded) form of a local model and a local copy of a sharded one.

    Args:
        make_model: the run's local model factory (an unsharded ``TorchRecDLRM``).
        lr: learning rate of the optimizers it builds (the run's ``cfg.lr``).
        ctx: this process's rank; with several, their process group must exist (a 1-process
            run gets its own at the first ``distribute``).
        device: where the model computes.
    """

    def __init__(self, make_model: Callable[[], nn.Module], lr: float, ctx: DistContext,
                 device: str = "cpu") -> None:
        self.make_model, self.lr, self.ctx = make_model, lr, ctx
        self.device = torch.device(device)

    def _prepare(self) -> None:
        """The process group DMP needs, and TorchRec's gradients summed (module docstring)."""
        comm_ops.set_gradient_division(False)
        if not dist.is_initialized():
            if self.ctx.world != 1:
                raise RuntimeError("a TorchRec run of several processes needs their process "
                                   "group (adsparse.online.distributed.spawn makes it)")
            # DMP needs a process group even alone; a 1-process one keeps a single code path.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def _plan(self, model: nn.Module) -> ShardingPlan:
        sharder = EmbeddingBagCollectionSharder()
        world, plan = dist.get_world_size(), {}
        for fqn, module in model.named_modules():
            if isinstance(module, EmbeddingBagCollection):
                tables = [c.name for c in module.embedding_bag_configs()]
                # The dense kernel keeps each table an ordinary parameter with a gradient, so
                # the run's own Adam trains it (TorchRec's fused kernels would update in place).
                place = {t: table_wise(rank=i % world,
                                       compute_kernel=EmbeddingComputeKernel.DENSE.value)
                         for i, t in enumerate(tables)}
                plan[fqn] = construct_module_sharding_plan(
                    module, place, sharder=sharder, world_size=world, local_size=world,
                    device_type=self.device.type)
        return ShardingPlan(plan)

    def distribute(self, model: nn.Module, opt: torch.optim.Optimizer
                   ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``model`` (local, unsharded) sharded over the ranks, with ``opt``'s state carried.

        Collective: every rank calls it with the same model. ``model`` itself is consumed
        (DMP swaps its tables for sharded ones).
        """
        self._prepare()
        full = {k: v.detach().clone() for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor)}
        states = {name: opt.state[p] for name, p in model.named_parameters() if p in opt.state}
        plan = self._plan(model)
        # TorchRec logs a warning for every table on the dense kernel, which is our choice.
        noisy = logging.getLogger("torchrec.distributed.utils")
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        try:
            sharded = ShardedModel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=self.device, plan=plan,
                                   sharders=[EmbeddingBagCollectionSharder()])
        finally:
            noisy.setLevel(level)
        current = sharded.state_dict()
        with torch.no_grad():
            for key, value in current.items():
                if isinstance(value, ShardedTensor):
                    located = _local_shard(value)
                    if located is not None:
                        located[0].copy_(full[key][located[1]])
                elif isinstance(value, torch.Tensor):
                    value.copy_(full[key])
        new_opt = make_optimizer(sharded, self.lr)
        for name, p in sharded.named_parameters():
            if name not in states or p.numel() == 0:
                continue
            located = _local_shard(current[name]) if name in sharded.sharded_names else None
            new_opt.state[p] = {
                k: v.clone() if k == "step" or located is None else v[located[1]].clone()
                for k, v in states[name].items()}
        return sharded, new_opt

    def gather(self, model: nn.Module, opt: torch.optim.Optimizer
               ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A local, unsharded copy of ``model`` (dense or block-sparse) and of ``opt``'s state
        (collective)."""
        if not isinstance(model, ShardedModel):
            raise TypeError(f"gather takes a model this placement distributed, got "
                            f"{type(model).__name__}")
        local = self.make_model()
        masks = block_masks(model)
        if masks:  # a sparse model: the local copy gets its block-sparse layers first
            sizes = {m.block_size for m in model.modules() if isinstance(m, BlockSparseLinear)}
            local = sparsify_(local, masks=masks, block_size=sizes.pop())
        local = load_sparse_state_dict(local, full_state_dict(model)).to(self.device)
        local_opt = make_optimizer(local, self.lr)
        params = dict(model.named_parameters())
        current = model.state_dict()
        for name, p in local.named_parameters():
            src = params[name]
            state = opt.state.get(src, {})
            if name not in model.sharded_names:
                if state:
                    local_opt.state[p] = {k: v.clone() for k, v in state.items()}
                continue
            # Only the owner has the table's state: every rank learns whether it exists and
            # its step, then assembles the moments like the weights.
            step = torch.tensor([float(state["step"]) if state else -1.0])
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            if step.item() < 0:
                continue
            local_opt.state[p] = {
                "step": torch.tensor(step.item(), dtype=torch.float32),
                **{k: _assemble(current[name], state.get(k)).to(self.device)
                   for k in ("exp_avg", "exp_avg_sq")}}
        return local, local_opt


def torchrec_components(make_model: Callable[[], nn.Module], lr: float, ctx: DistContext,
                        device: str = "cpu") -> Components:
    """The components of a run on a TorchRec model, sharded by DMP.

    ``make_model()`` returns the local model: a ``TorchRecDLRM``
    (``adsparse.models.torchrec_dlrm``), or any model called as ``(dense, ids)`` whose tables
    are TorchRec ``EmbeddingBagCollection`` modules; it must be deterministic (seed inside).
    The pruner and the metrics are the project's, as for its DLRM; ``lr`` is the run's
    ``cfg.lr``.
    """
    from adsparse.metrics import StreamingMetrics

    return Components(make_model, block_pruner, StreamingMetrics,
                      placement=TorchRecPlacement(make_model, lr, ctx, device))


def preset_torchrec_components(num_dense: int, embedding_sizes: list[int], preset: str,
                               seed: int, lr: float, ctx: DistContext, device: str = "cpu",
                               model: dict[str, Any] | None = None) -> Components:
    """:func:`torchrec_components` for TorchRec's DLRM with the layer sizes of ``preset`` (or
    ``model``: ``embedding_dim``, ``bottom_mlp``, ``top_mlp``), seeded with ``seed``."""
    from adsparse.models.torchrec_dlrm import torchrec_dlrm, torchrec_dlrm_preset

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        if model is not None:
            return torchrec_dlrm(num_dense, embedding_sizes, **model, device=device)
        return torchrec_dlrm_preset(preset, num_dense, embedding_sizes, device=device)

    return torchrec_components(make_model, lr, ctx, device)
