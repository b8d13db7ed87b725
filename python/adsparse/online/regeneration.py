"""Making a sparse model from the dense one, and storing it as plain data.

A *regeneration* (docs/online.md) is one dense-to-sparse transition: copy the continuously
trained dense model, let the pruner choose the masks on the recent batches (warm-started from
its previous transition), ``sparsify_`` the copy, optionally distill the dense model's
predictions into it, and give it the dense model's Adam state. Everything here runs on one rank;
the strategies broadcast the result.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adsparse.data.base import Batch
from adsparse.layout import BlockSparseWeight, block_mask_for_density
from adsparse.nn import BlockSparseLinear, load_sparse_state_dict, prunable_layers, sparsify_
from adsparse.online.components import Components, Placement, loss_fn
from adsparse.online.config import OnlineConfig
from adsparse.pruning.permutation import UnitOrder, permute_like, sort_units_
from adsparse.pruning.scorers import magnitude_scores

__all__ = ["SparseModel", "block_masks", "carry_adam_state", "distill", "magnitude_topk",
           "make_optimizer", "mlp_densities", "serving_density", "transition"]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of every model of a run."""
    # Fused Adam: one kernel per step instead of a dozen passes over the embedding tables,
    # which dominate the parameter count (dense gradients, see DLRM's sparse_grad).
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


@dataclass
class SparseModel:
    """A block-sparse model in flight (serving, or a challenger) and its optimizer."""

    model: nn.Module
    opt: torch.optim.Optimizer

    def state_dict(self, placement: Placement | None = None) -> dict[str, Any]:
        """Plain data: the parameters, the block masks (the model's structure) and Adam.

        With ``placement``, of its local copy (collective: a sharded model is gathered).
        """
        model, opt = (self.model, self.opt) if placement is None else placement.gather(
            self.model, self.opt)
        return {"model": model.state_dict(), "masks": block_masks(model),
                "opt": opt.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], comps: Components, cfg: OnlineConfig
                        ) -> SparseModel:
        """Rebuild from :meth:`state_dict`: the preset model, sparsified to the saved masks and
        laid out over the ranks by ``comps.placement`` (collective)."""
        model = sparsify_(comps.make_model(), masks=state["masks"], block_size=cfg.block_size)
        model = load_sparse_state_dict(model, state["model"]).to(cfg.device)
        opt = make_optimizer(model, cfg.lr)
        opt.load_state_dict(state["opt"])
        return cls(*comps.placement.distribute(model, opt))


def block_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The block grid mask of every block-sparse layer of ``model`` (by fully-qualified name)."""
    return {fqn: m.block_mask().cpu() for fqn, m in model.named_modules()
            if isinstance(m, BlockSparseLinear)}


def mlp_densities(model: nn.Module) -> dict[str, float]:
    """Density of every block-sparse layer of ``model`` (by fully-qualified name)."""
    return {fqn: m.density for fqn, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


def serving_density(model: nn.Module) -> float:
    """Kept share of all MLP weights (block-sparse and dense linear layers together)."""
    kept = total = 0.0
    for _, m in model.named_modules():
        if isinstance(m, BlockSparseLinear):
            n = m.out_features * m.in_features
            kept, total = kept + m.density * n, total + n
        elif isinstance(m, nn.Linear):
            kept, total = kept + m.weight.numel(), total + m.weight.numel()
    return kept / total if total else 1.0


def magnitude_topk(dense: nn.Module, counts: dict[str, int],
                   block_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per layer, the ``counts[fqn]`` blocks of ``dense`` of largest magnitude score."""
    layers = dict(prunable_layers(dense))
    out = {}
    for fqn, k in counts.items():
        score = magnitude_scores(layers[fqn].weight, block_size)
        out[fqn] = block_mask_for_density(score, k / score.numel()).cpu()
    return out


def carry_adam_state(src: nn.Module, src_opt: torch.optim.Optimizer, dst: nn.Module,
                     dst_opt: torch.optim.Optimizer,
                     orders: Sequence[UnitOrder] = ()) -> int:
    """Give ``dst``'s parameters the Adam state of the ``src`` parameters they were copied from.

    ``dst`` is ``src`` after ``sparsify_``: a parameter of the same name and shape (embeddings,
    biases, dense layers) takes its state as is; the ``values`` of a :class:`BlockSparseLinear`
    take the stored blocks' entries of the dense ``weight``'s state, packed in the same order.
    Without this a regenerated model starts with a fresh Adam, whose first steps move every
    parameter (the embedding tables included) by about ``lr`` whatever its gradient's scale.
    ``orders``: the unit orders ``dst`` was reordered by before ``sparsify_`` (the state is
    reordered the same way). Returns the number of parameters that got a state.
    """
    src_params = dict(src.named_parameters())
    modules = dict(dst.named_modules())
    carried = 0
    for name, p in dst.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        module = modules[mod_name]
        if isinstance(module, BlockSparseLinear) and leaf == "values":
            src_name = f"{mod_name}.weight" if mod_name else "weight"
            pack = (lambda t, m=module, n=src_name: BlockSparseWeight.from_dense(
                permute_like(n, t, orders), m.block_size, mask=m.block_mask()).values)
        else:
            src_name = name
            pack = (lambda t, n=src_name: permute_like(n, t, orders))
        w = src_params.get(src_name)
        state = src_opt.state.get(w) if w is not None else None
        if not state:
            continue
        new = {}
        for key, v in state.items():
            new[key] = v.clone() if key == "step" else pack(v.detach()).clone()
            if key != "step" and new[key].shape != p.shape:
                break
        else:
            dst_opt.state[p] = new
            carried += 1
    return carried


def distill(model: nn.Module, teacher: nn.Module, batches: Sequence[Batch], epochs: int,
            lr: float) -> None:
    """Train ``model`` to match ``teacher``'s predictions on ``batches`` (a fresh Adam).

    Hardening leaves the new model far from the dense one; training it on the recent labels
    again fits rows the dense model has already learned (and overfits them, embeddings most),
    while the dense model's own predictions carry its function without a second pass over the
    labels. All parameters train.
    """
    with torch.no_grad():
        soft = [Batch(b.dense, b.sparse, torch.sigmoid(teacher(b.dense, b.sparse)))
                for b in batches]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for b in soft:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, b).backward()
            opt.step()


def transition(dense: nn.Module, dense_opt: torch.optim.Optimizer, buffer: Sequence[Batch],
               density: float, method: str, pruner_state: dict | None, comps: Components,
               cfg: OnlineConfig) -> tuple[SparseModel, dict]:
    """One dense-to-sparse transition on the recent ``buffer``; the new model and pruner state.

    The pruner sees the last ``cfg.prune_batches`` batches of the buffer (its statistics and
    allocation is warm-started from ``pruner_state``); distillation, when on, sees them all.
    """
    model = copy.deepcopy(dense)
    # Sort the hidden units (and the DLRM's pair features) by magnitude first: the same
    # function, but the weights the blocks keep are then side by side (pruning/permutation.py).
    orders = sort_units_(model) if cfg.sort_units else []
    pruner = comps.make_pruner(model, density, method, cfg)
    if pruner_state is not None:
        pruner.load_state_dict(pruner_state)  # warm start from the last transition
    dev = cfg.device
    batches = [Batch(b.dense.to(dev), b.sparse.to(dev), b.labels.to(dev)) for b in buffer]
    masks = pruner.prune(batches[-cfg.prune_batches:], loss_fn, steps=cfg.prune_steps)
    model = sparsify_(model, masks=masks, block_size=cfg.block_size)
    if cfg.distill_epochs:
        distill(model, dense, batches, cfg.distill_epochs, cfg.lr)
    opt = make_optimizer(model, cfg.lr)
    if cfg.carry_optimizer:
        carry_adam_state(dense, dense_opt, model, opt, orders)
    return SparseModel(model, opt), pruner.state_dict()
