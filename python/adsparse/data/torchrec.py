"""TorchRec batches into the project's :class:`Batch` (needs ``adsparse[torchrec]``).

A TorchRec data pipeline yields ``torchrec.datasets.utils.Batch``: dense features, a
``KeyedJaggedTensor`` of sparse features and labels. The trainer's batches hold one ID per row
and field as a ``[B, F]`` tensor, which is what a DLRM on Criteo-like data has (TorchRec's own
Criteo pipeline too); :func:`from_torchrec_batch` converts, and refuses a feature with other
than one ID per row (multi-hot features would need pooled bags the ``[B, F]`` form cannot
hold); ``adsparse.models.torchrec_dlrm.ids_to_kjt`` goes back. :class:`TorchRecStream` turns
per-period iterables of TorchRec batches into a :class:`adsparse.data.base.Stream` the online
trainer runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from adsparse.data.base import Batch

__all__ = ["TorchRecStream", "from_torchrec_batch"]


def from_torchrec_batch(batch: TorchRecBatch, keys: Sequence[str] | None = None) -> Batch:
    """The :class:`Batch` of a TorchRec batch; ``sparse[:, f]`` is feature ``keys[f]``.

    ``keys`` defaults to the ``KeyedJaggedTensor``'s own key order. Raises ``ValueError`` when a
    feature has a row with no ID or several (the ``[B, F]`` form holds exactly one).
    """
    kjt: KeyedJaggedTensor = batch.sparse_features
    keys = list(kjt.keys()) if keys is None else list(keys)
    rows = batch.dense_features.shape[0]
    by_key = kjt.to_dict()
    columns = []
    for key in keys:
        if key not in by_key:
            raise ValueError(f"the batch has no sparse feature {key!r} (it has {kjt.keys()})")
        jagged = by_key[key]
        lengths = jagged.lengths()
        if lengths.numel() != rows or bool((lengths != 1).any()):
            raise ValueError(f"sparse feature {key!r} must have exactly one ID per row "
                             f"(lengths {lengths.tolist()[:8]}...); multi-hot features are "
                             "not supported")
        columns.append(jagged.values().to(torch.int64))
    sparse = (torch.stack(columns, dim=1) if columns
              else torch.empty(rows, 0, dtype=torch.int64))
    return Batch(batch.dense_features.float(), sparse, batch.labels.float().reshape(-1))


class TorchRecStream:
    """A :class:`adsparse.data.base.Stream` over TorchRec batches.

    Args:
        period_batches: ``period_batches(p)`` returns an iterable of TorchRec batches for period
            ``p``; it must be deterministic (a resumed run replays a period from its start).
        num_periods: how many periods there are.
        num_dense: dense features per row.
        embedding_sizes: rows of each feature's table, in the order of ``keys``.
        keys: the sparse feature keys, one per table.
    """

    def __init__(self, period_batches: Callable[[int], Iterable[TorchRecBatch]],
                 num_periods: int, num_dense: int, embedding_sizes: Sequence[int],
                 keys: Sequence[str]) -> None:
        if len(keys) != len(embedding_sizes):
            raise ValueError(f"{len(keys)} keys for {len(embedding_sizes)} embedding tables")
        self._period_batches = period_batches
        self._num_periods = int(num_periods)
        self.num_dense = int(num_dense)
        self.embedding_sizes = [int(n) for n in embedding_sizes]
        self.keys = list(keys)

    @property
    def num_periods(self) -> int:
        return self._num_periods

    def period(self, p: int) -> Iterator[Batch]:
        for batch in self._period_batches(p):
            yield from_torchrec_batch(batch, self.keys)

    def __repr__(self) -> str:
        return (f"TorchRecStream(num_periods={self.num_periods}, num_dense={self.num_dense}, "
                f"tables={len(self.keys)})")
