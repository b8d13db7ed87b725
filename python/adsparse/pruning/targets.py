"""The layers a pruner works on, their groups, and a training session that leaves the rest alone.

A *target* is one selected ``nn.Linear`` / ``SparseLinear`` with its group geometry: ``sizes``
holds the number of real weights in each group (1 per element; ``bn*bk`` per block, fewer in tail
blocks, so padding never counts towards the budget).

:class:`TransitionSession` is how the data-driven methods train through a mask without hooks or
parametrizations on the user's modules: each target layer is swapped for a :class:`MaskedProxy`
that shares the layer's own ``weight``/``bias`` Parameters (so training writes straight back to
the layer) and the originals are put back afterwards. Every other piece of training state the
transition could touch (``.grad``, ``requires_grad`` flags, buffers such as BatchNorm running
statistics) is saved and restored, and the target weights are rolled back if the transition fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import cycle
from typing import Any

import torch
from torch import nn

from adsparse import ops
from adsparse.layout import block_weight_counts
from adsparse.nn import SparseLinear, prunable_layers

__all__ = ["Context", "MaskedProxy", "Target", "TransitionSession", "check_loss",
           "cycle_batches", "find_targets"]

FilterFn = Callable[[nn.Module, str], bool]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(eq=False)
class Target:
    """One prunable layer: where it lives in the model and how its weight is cut into groups."""

    fqn: str
    module: nn.Module
    block_size: tuple[int, int] | None  # None: element granularity
    sizes: torch.Tensor  # float64 [grid]: real weights per group

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.sizes.shape)

    @property
    def num_weights(self) -> int:
        n, k = self.weight.shape
        return n * k


@dataclass(eq=False)
class Context:
    """Everything a method's runner gets (one signature for every method, see ``registry``).

    ``min_weights[l]``: the fewest real weights layer ``l`` keeps (``min_layer_density`` times
    its weights). ``budget``: the kept weights of all layers together (``density`` times their
    total). ``scores(target)``: the within-layer group importance of the pruner's scorer at the
    current step. For methods that train (``needs_data``), ``session`` holds the swapped-in
    proxies, ``batches`` is an endless iterator, ``optimizer`` steps the target layers'
    Parameters; otherwise these are ``None``. ``history`` collects one dict per step. ``state``
    is the method's own entry of the pruner's warm-start state (a dict it may read and update;
    it must hold only tensors and plain Python data). ``pruner`` is the calling ``Pruner``,
    whose attributes hold the methods' knobs (``gmp_update_every``, ``learned_config``).
    """

    targets: list[Target]
    density: float
    budget: float
    min_weights: list[float]
    scores: Callable[[Target], torch.Tensor]
    steps: int = 0
    session: TransitionSession | None = None
    batches: Iterator[Any] | None = None
    loss_fn: LossFn | None = None
    optimizer: torch.optim.Optimizer | None = None
    taylor: Any = None  # a scorers.TaylorScorer fed during the transition, or None
    history: list[dict[str, float]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    pruner: Any = None

    @property
    def sizes(self) -> list[torch.Tensor]:
        return [t.sizes for t in self.targets]


def find_targets(model: nn.Module, granularity: str, block_size: tuple[int, int],
                 filter_fn: FilterFn | None) -> list[Target]:
    """The selected linear layers of ``model`` as :class:`Target` s; raises on unusable layers."""
    targets = []
    for fqn, module in prunable_layers(model, filter_fn):
        n, k = module.weight.shape
        name = fqn or "<root>"
        if isinstance(module, SparseLinear) and (
            module.granularity != granularity
            or (granularity == "block" and tuple(module.block_size) != tuple(block_size))
        ):
            raise ValueError(
                f"SparseLinear {name!r} has granularity {module.granularity!r} and block "
                f"{tuple(module.block_size)}, but the pruner uses {granularity!r} and "
                f"{tuple(block_size)}; build the layer to match or exclude it with filter_fn"
            )
        if granularity == "element":
            targets.append(Target(fqn, module, None,
                                  torch.ones(n, k, dtype=torch.float64)))
            continue
        bn, bk = block_size
        if n < bn or k < bk:
            raise ValueError(
                f"layer {name!r} with weight [{n}, {k}] is smaller than one {bn}x{bk} block; "
                "exclude it with filter_fn, use a smaller block_size or granularity='element'"
            )
        targets.append(Target(fqn, module, (bn, bk), block_weight_counts((n, k), (bn, bk))))
    if not targets:
        raise ValueError("no prunable layers: the model has no nn.Linear/SparseLinear selected by "
                         "filter_fn")
    return targets


def cycle_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Endless batches: re-iterates a re-iterable, caches and repeats a one-shot iterator."""
    if iter(batches) is batches:  # a one-shot iterator: itertools.cycle remembers its items
        source = cycle(batches)
    else:
        def _again() -> Iterator[Any]:
            while True:
                empty = True
                for batch in batches:
                    empty = False
                    yield batch
                if empty:
                    return
        source = _again()
    first = next(source, _EMPTY)
    if first is _EMPTY:
        raise ValueError("batches is empty: the data-driven pruning methods need batches")

    def _chain() -> Iterator[Any]:
        yield first
        yield from source
    return _chain()


_EMPTY = object()


class MaskedProxy(nn.Module):
    """Stands in for a target layer during a transition: ``masked_linear`` with a pruner's mask.

    Holds the original layer's Parameters themselves (not copies). ``mask`` is a plain tensor
    attribute set by the pruner before every step (a hard 0/1 mask, which may require grad so
    that the loss's gradient with respect to each mask entry, ``dL/dM``, can be read). ``learned``
    measures cuts with two more plain attributes, None otherwise: ``override`` (``[N, K]``), a
    weight used instead of ``weight`` (the refit of ``LearnedConfig.repair``), and ``shift``
    (``[out_features]``), added to the output.
    """

    def __init__(self, target: Target):
        super().__init__()
        self.in_features = target.weight.shape[1]
        self.out_features = target.weight.shape[0]
        self.weight = target.module.weight
        self.bias = target.module.bias
        self.block_size = target.block_size
        self.mask: torch.Tensor = torch.ones(target.grid, dtype=self.weight.dtype,
                                             device=self.weight.device)
        self.override: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.override is None else self.override
        y = ops.masked_linear(x, weight, self.mask.to(self.weight.dtype), self.bias,
                              block_size=self.block_size)
        return y if self.shift is None else y + self.shift


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class TransitionSession:
    """Context manager: target layers swapped for proxies, only their Parameters trainable.

    On exit the original modules are back in place, every Parameter's ``.grad`` and
    ``requires_grad`` are as before, buffers are restored, and, if the block raised, the target
    layers' weights and biases too.
    """

    def __init__(self, model: nn.Module, targets: list[Target]):
        if any(t.fqn == "" for t in targets):
            raise ValueError("the model itself is the layer to prune; the data-driven methods "
                             "need it inside a container (e.g. nn.Sequential(layer))")
        self.model = model
        self.targets = targets
        self.proxies = [MaskedProxy(t) for t in targets]

    def trainable(self) -> list[nn.Parameter]:
        """The Parameters a transition may update: weight and bias of every target layer."""
        params = []
        for t in self.targets:
            params.append(t.module.weight)
            if t.module.bias is not None:
                params.append(t.module.bias)
        return params

    def __enter__(self) -> TransitionSession:
        params = list(self.model.parameters())
        self._grads = [(p, p.grad, p.requires_grad) for p in params]
        self._buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        trainable = self.trainable()
        self._snapshot = [(p, p.detach().clone()) for p in trainable]
        mine = {id(p) for p in trainable}
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in mine)
        for p in trainable:  # shared Parameters may live outside model.parameters() too
            p.grad = None
            p.requires_grad_(True)
        for t, proxy in zip(self.targets, self.proxies):
            parent, child = _parent(self.model, t.fqn)
            setattr(parent, child, proxy)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for t in self.targets:
            parent, child = _parent(self.model, t.fqn)
            setattr(parent, child, t.module)
        with torch.no_grad():
            if exc_type is not None:
                for p, saved in self._snapshot:
                    p.copy_(saved)
            for b, saved in self._buffers:
                b.copy_(saved)
        for p, grad, flag in self._grads:
            p.requires_grad_(flag)
            p.grad = grad


def check_loss(loss: Any, step: int, phase: str) -> torch.Tensor:
    """``loss`` as a finite scalar tensor, or a clear error naming the step."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                            else ""))
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} at step {step} of the {phase}; the "
                                 "pruned layers were restored to their weights before it")
    return loss.reshape(())
