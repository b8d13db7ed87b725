"""Reorder an MLP's units so that its important weights fall into few blocks (docs/pruning.md).

A block mask keeps or drops ``bn x bk`` tiles. When the inputs a layer needs are scattered over
its columns (the DLRM's top MLP reads ~350 pairwise dot products of which a regime uses a few
dozen), nearly every column block holds a few of them, and at density 0.1 each row block of
hidden units can see only a tenth of them. Reordering the hidden units of a chain
``Linear -> elementwise -> Linear`` (rows of the first, columns of the second, the bias with
the rows) computes the same function, and so does reordering the inputs of a layer when the
model can produce its features in another order (:class:`Permutable`). Sorting both by weight
magnitude puts the important units side by side, so the kept blocks cover them densely.

The plan is plain data (which parameter dimensions take which order), applied to the model
and, by :func:`permute_like`, to anything shaped like its parameters (an optimizer's moments).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["ELEMENTWISE", "Permutable", "UnitOrder", "apply_unit_orders_", "permute_like",
           "plan_unit_orders", "sort_units_"]

#: Modules between two linear layers that act on each unit alone, so reordering units commutes.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Identity, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Dropout)


@runtime_checkable
class Permutable(Protocol):
    """A model that can produce some layers' inputs in another order at no cost."""

    def permutable_inputs(self) -> dict[str, tuple[int, int]]:
        """``layer fqn -> (start, stop)``: the input columns of that layer it can reorder."""
        ...

    def permute_inputs_(self, layer: str, order: torch.Tensor) -> None:
        """Make new input column ``start + j`` of ``layer`` the old column ``start + order[j]``."""
        ...


@dataclass
class UnitOrder:
    """One reordering: every ``(parameter name, dim)`` in ``dims`` is indexed by ``order``.

    ``model_input`` names the layer whose inputs the model itself reorders (through
    :class:`Permutable`) and ``start`` the first of those columns; ``None`` for hidden units.
    """

    order: torch.Tensor
    dims: list[tuple[str, int]] = field(default_factory=list)
    model_input: str | None = None
    start: int = 0


def _linear_chains(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Linear]]]]:
    """Per ``nn.Sequential``: its prefix and its ``nn.Linear`` children, in order, split where
    anything but an elementwise module stands between two of them."""
    chains = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        run: list[tuple[str, nn.Linear]] = []
        for name, child in seq.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if type(child) is nn.Linear:
                run.append((fqn, child))
            elif not isinstance(child, ELEMENTWISE):
                if run:
                    chains.append((prefix, run))
                run = []
        if run:
            chains.append((prefix, run))
    return chains


def _descending(importance: torch.Tensor) -> torch.Tensor:
    # Stable, so units of equal importance (fresh zeros, ties) keep their order.
    return torch.sort(importance, descending=True, stable=True).indices


@torch.no_grad()
def plan_unit_orders(model: nn.Module) -> list[UnitOrder]:
    """Orders that sort ``model``'s hidden units and reorderable inputs by weight magnitude.

    A hidden unit between linear layers ``A`` and ``B`` is ranked by
    ``||A.weight[i, :]|| * ||B.weight[:, i]||`` (it matters when it both receives and sends);
    a reorderable input column ``c`` of layer ``L`` by ``||L.weight[:, c]||``. Only plain
    ``nn.Linear`` layers of ``nn.Sequential`` containers are considered (a model before
    ``sparsify_``). Every order is computed from the weights as they are now; applying them in
    any sequence gives the same model, since each touches its own dimensions.
    """
    orders: list[UnitOrder] = []
    inputs = model.permutable_inputs() if isinstance(model, Permutable) else {}
    for _, chain in _linear_chains(model):
        first_fqn, first = chain[0]
        if first_fqn in inputs:
            start, stop = inputs[first_fqn]
            imp = first.weight[:, start:stop].float().norm(dim=0)
            orders.append(UnitOrder(_descending(imp), [(f"{first_fqn}.weight", 1)],
                                    model_input=first_fqn, start=start))
        for (a_fqn, a), (b_fqn, b) in itertools.pairwise(chain):
            imp = a.weight.float().norm(dim=1) * b.weight.float().norm(dim=0)
            dims = [(f"{a_fqn}.weight", 0), (f"{b_fqn}.weight", 1)]
            if a.bias is not None:
                dims.append((f"{a_fqn}.bias", 0))
            orders.append(UnitOrder(_descending(imp), dims))
    return orders


def _take(t: torch.Tensor, dim: int, order: torch.Tensor, start: int) -> torch.Tensor:
    idx = torch.arange(t.shape[dim], device=t.device)
    idx[start:start + order.numel()] = order.to(t.device) + start
    return t.index_select(dim, idx)


def permute_like(name: str, tensor: torch.Tensor, orders: Sequence[UnitOrder]) -> torch.Tensor:
    """``tensor``, shaped like parameter ``name`` of the model the orders were planned on,
    reordered as :func:`apply_unit_orders_` reorders that parameter (a new tensor, or
    ``tensor`` itself when no order touches it)."""
    for uo in orders:
        for pname, dim in uo.dims:
            if pname == name:
                tensor = _take(tensor, dim, uo.order, uo.start)
    return tensor


@torch.no_grad()
def apply_unit_orders_(model: nn.Module, orders: Sequence[UnitOrder]) -> nn.Module:
    """Reorder ``model``'s units in place (its function is unchanged). Returns the model."""
    params: Mapping[str, nn.Parameter] = dict(model.named_parameters())
    for uo in orders:
        if uo.model_input is not None:
            if not isinstance(model, Permutable):
                raise TypeError(f"{type(model).__name__} cannot reorder the inputs of "
                                f"{uo.model_input!r}")
            model.permute_inputs_(uo.model_input, uo.order)
    for name, p in params.items():
        p.data = permute_like(name, p.data, orders).contiguous()
    return model


def sort_units_(model: nn.Module) -> list[UnitOrder]:
    """Sort ``model``'s hidden units and reorderable inputs by magnitude, in place.

    Call it on a dense model right before choosing its block masks. Returns the orders, for
    :func:`permute_like` (e.g. to reorder an optimizer state the same way).
    """
    orders = plan_unit_orders(model)
    apply_unit_orders_(model, orders)
    return orders
