"""TorchRec's DLRM behind the interface of the project's models (needs ``adsparse[torchrec]``).

Every part of adsparse calls a model as ``model(dense, sparse)`` with ``sparse`` a ``[B, F]``
tensor of IDs, one per field (``adsparse.data.base.Batch``). :class:`TorchRecDLRM` wraps any
TorchRec model that takes ``(dense_features, KeyedJaggedTensor)`` and returns ``[B, 1]`` logits
(``torchrec.models.dlrm.DLRM`` and its variants) and builds the ``KeyedJaggedTensor`` from the
ID tensor, so the pruner, ``sparsify_`` and the online trainer need nothing TorchRec-specific.
TorchRec wraps each MLP layer's ``nn.Linear`` in a ``Perceptron`` (``…_mlp.0._linear``) and ends
the over arch with a bare ``nn.Linear``; both are ``nn.Linear`` modules reached by name, so
``sparsify_`` replaces them like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM as TorchRecDLRMArch

from adsparse.models.dlrm import PRESETS

__all__ = ["TorchRecDLRM", "feature_names", "ids_to_kjt", "torchrec_dlrm", "torchrec_dlrm_preset"]


def feature_names(num_sparse: int) -> list[str]:
    """The TorchRec feature key of each sparse field, in field order (``cat_0``, ``cat_1``...)."""
    return [f"cat_{f}" for f in range(num_sparse)]


def ids_to_kjt(sparse: torch.Tensor, keys: Sequence[str]) -> KeyedJaggedTensor:
    """``[B, F]`` IDs (one per row and field) as a ``KeyedJaggedTensor`` with lengths of 1."""
    if sparse.dim() != 2 or sparse.shape[1] != len(keys):
        raise ValueError(f"sparse IDs must be [B, {len(keys)}], got {tuple(sparse.shape)}")
    # A KeyedJaggedTensor is key-major: every row's value of the first key, then the next key.
    values = sparse.t().reshape(-1).to(torch.int64)
    lengths = torch.ones(values.numel(), dtype=torch.int32, device=sparse.device)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=values, lengths=lengths)


class TorchRecDLRM(nn.Module):
    """A TorchRec model called as ``forward(dense, sparse_ids)``; returns logits ``[B]``.

    Args:
        model: takes ``(dense_features, sparse_features: KeyedJaggedTensor)``, returns
            ``[B, 1]`` logits (TorchRec's ``DLRM``).
        keys: the feature key of each column of ``sparse_ids``.
    """

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.dlrm = model
        self.keys = list(keys)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.dlrm(dense, ids_to_kjt(sparse, self.keys)).squeeze(-1)


def torchrec_dlrm(num_dense: int, embedding_sizes: Sequence[int], embedding_dim: int,
                  bottom_mlp: Sequence[int], top_mlp: Sequence[int],
                  device: torch.device | str = "cpu") -> TorchRecDLRM:
    """TorchRec's ``DLRM``, one embedding table per field (``t_<f>``, feature ``cat_<f>``).

    ``bottom_mlp`` is its dense arch (the last size must be ``embedding_dim``), ``top_mlp`` its
    over arch (the last size 1). TorchRec initialises the weights: seed torch before calling
    for a deterministic model.
    """
    keys = feature_names(len(embedding_sizes))
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=int(embedding_dim),
                                 num_embeddings=int(rows), feature_names=[keys[f]])
              for f, rows in enumerate(embedding_sizes)]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
    arch = TorchRecDLRMArch(ebc, num_dense, [int(n) for n in bottom_mlp],
                            [int(n) for n in top_mlp], dense_device=torch.device(device))
    return TorchRecDLRM(arch, keys)


def torchrec_dlrm_preset(name: str, num_dense: int, embedding_sizes: Sequence[int],
                         device: torch.device | str = "cpu") -> TorchRecDLRM:
    """:func:`torchrec_dlrm` with the layer sizes of the project's DLRM preset ``name``.

    TorchRec's interaction also feeds the dots with the dense vector, so its over arch is a
    little wider than the project's DLRM's top MLP.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown DLRM preset {name!r}; choose from {sorted(PRESETS)}")
    return torchrec_dlrm(num_dense, embedding_sizes, **PRESETS[name], device=device)
