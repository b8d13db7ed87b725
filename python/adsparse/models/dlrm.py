"""DLRM after facebookresearch/dlrm: embeddings, bottom MLP, pairwise-dot interaction, top MLP.

The MLP layers are plain ``nn.Linear`` modules that are direct children of ``nn.Sequential``
containers (``bottom_mlp`` and ``top_mlp``), so ``adsparse.sparsify_`` / ``from_linear`` can
swap each of them for a sparse module by name. :func:`mlp_layers` lists them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adsparse.interaction import dot_interaction

__all__ = [
    "DLRM",
    "PRESETS",
    "dlrm_preset",
    "fuse_relu_",
    "interaction_features",
    "mlp_layers",
]


def _dlrm_init_(linear: nn.Linear) -> nn.Linear:
    # The reference implementation's init (Glorot-like normal weights, normal bias); kept so
    # training curves are comparable with dlrm's.
    fan_out, fan_in = linear.weight.shape
    with torch.no_grad():
        linear.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        linear.bias.normal_(0.0, math.sqrt(1.0 / fan_out))
    return linear


def _mlp(in_features: int, sizes: Sequence[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, out_features in enumerate(sizes):
        layers.append(_dlrm_init_(nn.Linear(in_features, int(out_features))))
        if i < len(sizes) - 1 or relu_last:
            layers.append(nn.ReLU())
        in_features = int(out_features)
    return nn.Sequential(*layers)


def interaction_features(num_sparse: int, embedding_dim: int) -> int:
    """Width of the interaction output: the bottom output plus one dot per pair of vectors."""
    vectors = num_sparse + 1
    return embedding_dim + vectors * (vectors - 1) // 2


class DLRM(nn.Module):
    """A DLRM click model: ``forward(dense, sparse)`` returns logits ``[B]``.

    Args:
        num_dense: number of dense features (the bottom MLP's input).
        embedding_sizes: rows of each embedding table (one categorical field per table).
        embedding_dim: width of every embedding and of the bottom MLP's output.
        bottom_mlp: output sizes of the bottom layers (input excluded); the last must equal
            ``embedding_dim``. Every bottom layer is followed by a ReLU, as in dlrm.
        top_mlp: output sizes of the top layers after the interaction (its input width is
            derived: ``embedding_dim + (F+1)F/2`` for ``F`` tables); the last must be 1 and has
            no ReLU (the model returns logits; :meth:`predict` applies the sigmoid).
        sparse_grad: give the embedding tables sparse gradients (for SGD/SparseAdam on large
            tables); off by default because dense Adagrad/Adam is what the stream trainer uses.
    """

    def __init__(
        self,
        num_dense: int,
        embedding_sizes: Sequence[int],
        embedding_dim: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        if num_dense < 1:
            raise ValueError(f"num_dense must be >= 1, got {num_dense}")
        if len(embedding_sizes) < 1 or min(embedding_sizes) < 1:
            raise ValueError(f"embedding_sizes must be positive, got {list(embedding_sizes)}")
        if not bottom_mlp or int(bottom_mlp[-1]) != embedding_dim:
            raise ValueError(
                f"the last bottom_mlp size must equal embedding_dim={embedding_dim}, "
                f"got {list(bottom_mlp)}"
            )
        if not top_mlp or int(top_mlp[-1]) != 1:
            raise ValueError(f"the last top_mlp size must be 1, got {list(top_mlp)}")
        self.num_dense = int(num_dense)
        self.embedding_sizes = [int(n) for n in embedding_sizes]
        self.embedding_dim = int(embedding_dim)
        self.embeddings = nn.ModuleList()
        for rows in self.embedding_sizes:
            table = nn.EmbeddingBag(rows, embedding_dim, mode="sum", sparse=sparse_grad)
            bound = math.sqrt(1.0 / rows)
            nn.init.uniform_(table.weight, -bound, bound)
            self.embeddings.append(table)
        self.bottom_mlp = _mlp(num_dense, bottom_mlp, relu_last=True)
        num_vectors = len(self.embedding_sizes) + 1
        self.top_mlp = _mlp(
            interaction_features(len(self.embedding_sizes), embedding_dim), top_mlp,
            relu_last=False,
        )
        # Upper triangle without the diagonal: each unordered pair of vectors once, as flat
        # indices into the Gram matrix, in the order the top MLP reads them. Persistent: a
        # regeneration may reorder them (permute_inputs_), and the model's weights match that
        # order.
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("pair_index", rows * num_vectors + cols)

    @property
    def num_sparse(self) -> int:
        return len(self.embedding_sizes)

    def permutable_inputs(self) -> dict[str, tuple[int, int]]:
        """The top MLP's pair features (after the bottom output) can come in any order."""
        first = next(name for name, _ in self.top_mlp.named_children())
        return {f"top_mlp.{first}": (self.embedding_dim, self.top_mlp[0].in_features)}

    def permute_inputs_(self, layer: str, order: torch.Tensor) -> None:
        """Read the pairs in another order: new pair feature ``j`` is old pair ``order[j]``.

        The caller reorders the columns of ``layer``'s weight the same way
        (``adsparse.pruning.permutation``); together the model's function is unchanged.
        """
        if layer not in self.permutable_inputs():
            raise ValueError(f"DLRM reorders the inputs of {sorted(self.permutable_inputs())}, "
                             f"not of {layer!r}")
        order = torch.as_tensor(order, dtype=torch.long, device=self.pair_index.device)
        n = self.pair_index.numel()
        if order.shape != (n,) or not torch.equal(order.sort().values,
                                                  torch.arange(n, device=order.device)):
            raise ValueError(f"order must be a permutation of range({n})")
        self.pair_index = self.pair_index[order]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "pair_index"
        if key not in state_dict:
            # Saved before the order was part of the state: the pairs were in triangle order.
            state_dict[key] = self._triangle_order()
        elif not torch.equal(state_dict[key].sort().values.cpu(),
                             self._triangle_order().sort().values.cpu()):
            error_msgs.append(f"{key}: not a reordering of the model's "
                              f"{self.pair_index.numel()} pairs")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _triangle_order(self) -> torch.Tensor:
        n = self.num_sparse + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        return (rows * n + cols).to(self.pair_index.device)

    def _check_inputs(self, dense: torch.Tensor, sparse: torch.Tensor) -> None:
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"dense must be [B, {self.num_dense}], got {tuple(dense.shape)}")
        if sparse.dim() != 2 or sparse.shape[1] != self.num_sparse:
            raise ValueError(f"sparse must be [B, {self.num_sparse}], got {tuple(sparse.shape)}")
        if sparse.shape[0] != dense.shape[0]:
            raise ValueError(
                f"dense has {dense.shape[0]} rows but sparse has {sparse.shape[0]}"
            )

    def _lookups(self, sparse: torch.Tensor) -> list[torch.Tensor]:
        # A bag of one ID sums to that ID's row, so the rows are gathered with F.embedding on
        # each EmbeddingBag's weight: the bag op's per-call set-up (offsets, bag bookkeeping)
        # made it ~5x slower per table at B=512 (measured), and serving pays it 26 times.
        return [F.embedding(sparse[:, f], table.weight, sparse=table.sparse)
                for f, table in enumerate(self.embeddings)]

    def embed(self, sparse: torch.Tensor) -> torch.Tensor:
        """``[B, F, embedding_dim]`` embeddings of the IDs ``sparse[:, f]`` (one ID per bag)."""
        return torch.stack(self._lookups(sparse), dim=1)

    def _pairwise(self, bottom: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        dots = torch.bmm(vectors, vectors.transpose(1, 2))
        # One flat index_select: indexing dots[:, rows, cols] costs several times more.
        pairs = dots.flatten(1).index_select(1, self.pair_index)
        return torch.cat([bottom, pairs], dim=1)

    def interact(self, bottom: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Concatenate ``bottom`` with the dot products of every pair of the F+1 vectors.

        ``embedded`` is ``[B, F, embedding_dim]``; the pairs are the upper triangle (without
        the diagonal) of the Gram matrix of ``[bottom, embedded_0, ..., embedded_{F-1}]``,
        row by row.
        """
        return self._pairwise(bottom, torch.cat([bottom.unsqueeze(1), embedded], dim=1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` for dense features ``[B, num_dense]`` and IDs ``[B, F]``.

        Without autograd (``torch.no_grad``, ``torch.inference_mode``) and in fp32, the lookups
        and the interaction are one op (``adsparse.interaction.dot_interaction``) that reads the
        table rows in place; with autograd they are the composite below (same numbers up to
        summation order).
        """
        self._check_inputs(dense, sparse)
        bottom = self.bottom_mlp(dense)
        if (not torch.is_grad_enabled() and bottom.dtype == torch.float32
                and sparse.dtype == torch.int64):
            tables = [table.weight for table in self.embeddings]
            z = dot_interaction(bottom, sparse, tables, self.pair_index)
            return self.top_mlp(z).squeeze(-1)
        # Stacking bottom with the lookups at once saves a copy of the [B, F, d] block.
        vectors = torch.stack([bottom, *self._lookups(sparse)], dim=1)
        return self.top_mlp(self._pairwise(bottom, vectors)).squeeze(-1)

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Click probabilities ``[B]`` (sigmoid of the logits), without autograd."""
        return torch.sigmoid(self.forward(dense, sparse))


def mlp_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fully qualified name, module)`` of every MLP linear layer, bottom first.

    These are the children of ``bottom_mlp`` and ``top_mlp`` that carry ``in_features`` and
    ``out_features`` (``nn.Linear`` and the sparse modules that replace it), i.e. the layers a
    pruner works on. The embedding tables are not included.
    """
    found = []
    for container in ("bottom_mlp", "top_mlp"):
        seq = getattr(model, container)
        for name, child in seq.named_children():
            if hasattr(child, "in_features") and hasattr(child, "out_features"):
                found.append((f"{container}.{name}", child))
    return found


def fuse_relu_(model: nn.Module) -> nn.Module:
    """Fold each ``nn.ReLU`` into the sparse layer before it, in place (for serving).

    A layer qualifies when it has an ``activation`` attribute set to ``None`` (as
    ``adsparse.nn.BlockSparseLinear`` has) and the next child of the same ``nn.Sequential`` is
    an ``nn.ReLU``: the layer gets ``activation="relu"`` (applied in the kernel's epilogue, one
    pass over the output fewer) and the ReLU becomes ``nn.Identity`` so indices stay the same.
    Plain ``nn.Linear`` layers are left alone. Returns the model.
    """
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (_, layer), (next_name, nxt) in itertools.pairwise(children):
            if getattr(layer, "activation", "absent") is None and isinstance(nxt, nn.ReLU):
                layer.activation = "relu"
                setattr(seq, next_name, nn.Identity())
    return model


# Bottom sizes exclude the input (it is num_dense); top sizes come after the interaction.
PRESETS: dict[str, dict] = {
    "kaggle": {"embedding_dim": 16, "bottom_mlp": [512, 256, 64, 16], "top_mlp": [512, 256, 1]},
    "wide": {
        "embedding_dim": 64,
        "bottom_mlp": [512, 256, 64],
        "top_mlp": [1024, 1024, 512, 256, 1],
    },
}


def dlrm_preset(name: str, num_dense: int, embedding_sizes: Sequence[int], **kwargs) -> DLRM:
    """A :class:`DLRM` with the layer sizes of preset ``name`` (``"kaggle"`` or ``"wide"``).

    ``kaggle`` is dlrm's Criteo Kaggle configuration (bottom 13-512-256-64-16, top 512-256-1,
    dim 16); ``wide`` a heavier serving model (bottom 13-512-256-64, top 1024-1024-512-256-1,
    dim 64). Extra keyword arguments go to :class:`DLRM`.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown DLRM preset {name!r}; choose from {sorted(PRESETS)}")
    return DLRM(num_dense, embedding_sizes, **PRESETS[name], **kwargs)
