"""The pieces a run is built from: the model, the pruner, the metrics and the placement.

The trainer only sees these factories, so tests can swap in small stand-ins; the defaults
are the project's DLRM, ``adsparse.pruning.Pruner``, ``adsparse.metrics.StreamingMetrics`` and
whole models on every rank (``online/torchrec.py`` shards TorchRec's tables instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from adsparse.data.base import Batch
from adsparse.online.config import OnlineConfig

__all__ = ["Components", "LocalPlacement", "MetricsLike", "Placement", "PrunerLike",
           "block_pruner", "default_components", "loss_fn"]


class PrunerLike(Protocol):
    def prune(self, batches: Sequence[Batch], loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
              steps: int = ...) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MetricsLike(Protocol):
    def update(self, labels: torch.Tensor, preds: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Placement(Protocol):
    """How a model is laid out over the ranks while it trains.

    ``make_model()`` builds a *local* model (whole in this process): the pruner, ``sparsify_``
    and distillation work on that form. ``distribute`` turns a local model and its optimizer
    into the form that trains (for TorchRec: tables sharded over the ranks, see
    ``online/torchrec.py``); ``gather`` makes a local copy of a trained one for a transition.
    Both are collective: every rank calls them at the same point.
    """

    def distribute(self, model: nn.Module, opt: torch.optim.Optimizer
                   ) -> tuple[nn.Module, torch.optim.Optimizer]: ...

    def gather(self, model: nn.Module, opt: torch.optim.Optimizer
               ) -> tuple[nn.Module, torch.optim.Optimizer]: ...


class LocalPlacement:
    """Every rank holds whole models: both directions are the identity (the default)."""

    def distribute(self, model: nn.Module, opt: torch.optim.Optimizer
                   ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, opt

    def gather(self, model: nn.Module, opt: torch.optim.Optimizer
               ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, opt  # a transition copies the model itself


@dataclass
class Components:
    """``make_model()`` must be deterministic (seed it inside): every strategy starts from it."""

    make_model: Callable[[], nn.Module]
    # (model, density, method, the run's config) -> a pruner of the model's MLP layers
    make_pruner: Callable[[nn.Module, float, str, OnlineConfig], PrunerLike]
    make_metrics: Callable[[], MetricsLike]
    placement: Placement = field(default_factory=LocalPlacement)


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy of the model's logits: the task loss of every transition."""
    return F.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels)


def block_pruner(model: nn.Module, density: float, method: str, cfg: OnlineConfig
                 ) -> PrunerLike:
    """The project's :class:`adsparse.pruning.Pruner` on ``model``'s layers of at least one
    block of ``cfg.block_size`` (every run's ``make_pruner``); ``learned`` keeps every layer
    at ``cfg.learned_min_share`` of the density or more."""
    from adsparse.pruning import LearnedConfig, Pruner

    bn, bk = cfg.block_size

    # Layers thinner than one block (dlrm's 13-wide input layer, the 1-wide head) hold a
    # few thousand weights between them; they stay dense rather than fail the pruner.
    def fits(module: nn.Module, fqn: str) -> bool:
        return module.out_features >= bn and module.in_features >= bk

    # Raw cuts unless cfg.learned_repair: the online benchmark (docs/online.md) measured learned
    # before the repaired measurement of its cuts (docs/pruning.md) existed.
    return Pruner(model, density, method=method, granularity="block", block_size=(bn, bk),
                  filter_fn=fits, learned=LearnedConfig(min_share=cfg.learned_min_share,
                                                        compensate=False,
                                                        repair=cfg.learned_repair))


def default_components(num_dense: int, embedding_sizes: list[int], preset: str = "kaggle",
                       seed: int = 0, model: dict[str, Any] | None = None) -> Components:
    """DLRM ``preset`` (or ``DLRM(**model)``) for the stream's features, the project pruner
    and metrics."""
    from adsparse.metrics import StreamingMetrics
    from adsparse.models import DLRM, dlrm_preset

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        if model is not None:
            return DLRM(num_dense, embedding_sizes, **model)
        return dlrm_preset(preset, num_dense, embedding_sizes)

    return Components(make_model, block_pruner, StreamingMetrics)
