"""What every stream yields: periods of mini-batches ready for the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch


class Batch(NamedTuple):
    """One mini-batch. ``sparse[:, f]`` is already an index into table ``f`` (one ID per field)."""

    dense: torch.Tensor  # [B, num_dense] float32 (log1p-transformed counts for Criteo)
    sparse: torch.Tensor  # [B, num_sparse] int64, sparse[:, f] in [0, embedding_sizes[f])
    labels: torch.Tensor  # [B] float32 in {0, 1}


@runtime_checkable
class Stream(Protocol):
    """A non-stationary stream: ``num_periods`` periods (days/hours) of mini-batches.

    ``period(p)`` is deterministic and can be called for any ``p`` in any order, so a resumed
    run can start at the period where it stopped without replaying the earlier ones.
    """

    num_dense: int
    embedding_sizes: list[int]

    @property
    def num_periods(self) -> int: ...

    def period(self, p: int) -> Iterator[Batch]: ...
