"""BlockSparseWeight: the packed block-sparse (BSR) format the kernels read.

A weight ``W`` of shape ``(N, K)`` (out_features x in_features) is cut into blocks of
``(bn, bk)`` rows x columns. Only the stored blocks are kept, packed contiguously in
``values [nnzb, bn, bk]`` so that a kernel streams them. Tail blocks (when ``bn`` does not
divide ``N`` or ``bk`` does not divide ``K``) are zero-padded in ``values``; the kernels never
read or write past ``N``/``K`` in the dense operands.

Index (CSR over block rows, like ``torch.sparse_bsr``):

* ``row_offsets [ceil(N/bn) + 1]``: block-row ``r`` holds blocks
  ``row_offsets[r]:row_offsets[r+1]``.
* ``col_indices [nnzb]``: block-column of each stored block, strictly increasing within a row.

Transposed index (CSR over block columns), used by the input gradient ``dx = dy @ W`` so that
each block-column of ``dx`` is owned by one thread (no atomics):

* ``t_row_offsets [ceil(K/bk) + 1]``, ``t_col_indices [nnzb]`` (block-row of each block),
  ``t_block_ids [nnzb]`` (position of that block in ``values``).

All index tensors are int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adsparse.checks import check_block_size, check_density

__all__ = [
    "BlockSparseWeight",
    "block_norms",
    "block_row_ids",
    "transpose_index",
]


def _pad_to_blocks(dense: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = dense.shape
    rows, cols = math.ceil(n / bn), math.ceil(k / bk)
    if rows * bn == n and cols * bk == k:
        return dense
    padded = dense.new_zeros(rows * bn, cols * bk)
    padded[:n, :k] = dense
    return padded


def block_norms(dense: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """L2 norm of every ``(bn, bk)`` block of a 2-D tensor: ``[ceil(N/bn), ceil(K/bk)]``."""
    bn, bk = block_size
    padded = _pad_to_blocks(dense.detach(), bn, bk)
    rows, cols = padded.shape[0] // bn, padded.shape[1] // bk
    blocks = padded.reshape(rows, bn, cols, bk).float()
    return blocks.pow(2).sum(dim=(1, 3)).sqrt()


def block_row_ids(row_offsets: torch.Tensor) -> torch.Tensor:
    """``[nnzb]``: the block row of every stored block of a CSR block index (same device)."""
    counts = row_offsets[1:] - row_offsets[:-1]
    rows = torch.arange(counts.numel(), device=row_offsets.device)
    return torch.repeat_interleave(rows, counts)


def transpose_index(
    row_offsets: torch.Tensor, col_indices: torch.Tensor, num_block_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR index over block columns: ``(t_row_offsets, t_col_indices, t_block_ids)``."""
    block_rows = block_row_ids(row_offsets)
    # Stable sort by column keeps block rows increasing inside each block column.
    order = torch.sort(col_indices, stable=True).indices
    t_col_indices = block_rows[order]
    per_col = torch.bincount(col_indices, minlength=num_block_cols)
    t_row_offsets = torch.zeros(num_block_cols + 1, dtype=torch.int64, device=row_offsets.device)
    t_row_offsets[1:] = torch.cumsum(per_col, 0)
    return t_row_offsets, t_col_indices.to(torch.int64), order.to(torch.int64)


@dataclass(eq=False)
class BlockSparseWeight:
    """A block-sparse ``(N, K)`` weight in the packed layout described in this module.

    Build one with :meth:`from_dense` (with a block mask or a target density) or
    :meth:`from_sparse_bsr`; the constructor checks the metadata (``validate()``) unless told
    not to, so corrupt indices raise ``ValueError`` here and never reach a kernel.
    """

    values: torch.Tensor
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    shape: tuple[int, int]
    t_row_offsets: torch.Tensor | None = None
    t_col_indices: torch.Tensor | None = None
    t_block_ids: torch.Tensor | None = None
    check: bool = True

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        # The kernels walk the index through raw pointers: a strided or expanded view (a slice
        # of another tensor) would be read as garbage, so own a dense copy of each index.
        for name in ("row_offsets", "col_indices", "t_row_offsets", "t_col_indices",
                     "t_block_ids"):
            index = getattr(self, name)
            if isinstance(index, torch.Tensor) and not index.is_contiguous():
                setattr(self, name, index.contiguous())
        if self.check:
            self._validate_forward_index()
        if self.t_row_offsets is None:
            self.t_row_offsets, self.t_col_indices, self.t_block_ids = transpose_index(
                self.row_offsets, self.col_indices, self.grid[1]
            )
        if self.check:
            self.validate()

    # ----------------------------------------------------------------- properties
    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def grid(self) -> tuple[int, int]:
        """Number of block rows and block columns."""
        (n, k), (bn, bk) = self.shape, self.block_size
        return math.ceil(n / bn), math.ceil(k / bk)

    @property
    def nnzb(self) -> int:
        return int(self.col_indices.numel())

    @property
    def density(self) -> float:
        """Share of the ``N*K`` weights inside stored blocks (padding excluded)."""
        n, k = self.shape
        if n * k == 0:
            return 0.0
        return float(self.block_mask().float().mul(self._block_weight_counts()).sum()) / (n * k)

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus both indices."""
        tensors = [self.values, self.row_offsets, self.col_indices, self.t_row_offsets,
                   self.t_col_indices, self.t_block_ids]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    # ----------------------------------------------------------------- checks
    def _validate_forward_index(self) -> None:
        n, k = self.shape
        if n < 0 or k < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        if self.values.dim() != 3:
            raise ValueError(f"values must be [nnzb, bn, bk], got shape {tuple(self.values.shape)}")
        bn, bk = self.block_size
        if bn < 1 or bk < 1:
            raise ValueError(f"block size must be >= 1, got {(bn, bk)}")
        rows, cols = self.grid
        _check_csr(self.row_offsets, self.col_indices, rows, cols, "row_offsets", "col_indices")
        if self.values.shape[0] != self.col_indices.numel():
            raise ValueError(
                f"values holds {self.values.shape[0]} blocks but col_indices has "
                f"{self.col_indices.numel()}"
            )
        if self.col_indices.numel() > 1:
            same_row = block_row_ids(self.row_offsets.cpu())
            step = self.col_indices.cpu().diff()
            if bool(((step <= 0) & (same_row.diff() == 0)).any()):
                raise ValueError("col_indices must be strictly increasing within each block row")

    def validate(self) -> None:
        """Raise ``ValueError`` if any field is inconsistent with the others."""
        self._validate_forward_index()
        rows, cols = self.grid
        if self.t_row_offsets is None or self.t_col_indices is None or self.t_block_ids is None:
            raise ValueError("transposed index is missing")
        _check_csr(self.t_row_offsets, self.t_col_indices, cols, rows, "t_row_offsets",
                   "t_col_indices")
        ids = self.t_block_ids.cpu()
        if ids.dtype != torch.int64 or ids.numel() != self.nnzb:
            raise ValueError("t_block_ids must be int64 with one entry per stored block")
        if self.nnzb and not torch.equal(torch.sort(ids).values, torch.arange(self.nnzb)):
            raise ValueError("t_block_ids must be a permutation of the stored blocks")
        expected = transpose_index(self.row_offsets.cpu(), self.col_indices.cpu(), cols)
        got = (self.t_row_offsets.cpu(), self.t_col_indices.cpu(), ids)
        if not all(torch.equal(a, b) for a, b in zip(expected, got)):
            raise ValueError("transposed index does not match row_offsets/col_indices")
        index_devices = {t.device for t in (self.row_offsets, self.col_indices, self.t_row_offsets,
                                            self.t_col_indices, self.t_block_ids)}
        if index_devices != {self.values.device}:
            raise ValueError(f"index tensors must be on {self.values.device}, got {index_devices}")

    # ----------------------------------------------------------------- conversions
    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block_size: tuple[int, int] = (16, 16),
        mask: torch.Tensor | None = None,
        density: float | None = None,
    ) -> BlockSparseWeight:
        """Pack the blocks of ``dense`` chosen by a block ``mask`` or by a target ``density``.

        ``mask`` is ``[ceil(N/bn), ceil(K/bk)]`` (nonzero = keep). With ``density``, the
        ``round(density * num_blocks)`` blocks of largest L2 norm are kept.
        With neither, every block is kept.
        """
        if dense.dim() != 2:
            raise ValueError(f"dense must be 2-D, got {dense.dim()}-D")
        bn, bk = check_block_size(block_size)
        if mask is not None and density is not None:
            raise ValueError("give mask or density, not both")
        n, k = dense.shape
        rows, cols = math.ceil(n / bn), math.ceil(k / bk)
        if density is not None:
            mask = block_mask_for_density(block_norms(dense, (bn, bk)), density)
        elif mask is None:
            mask = torch.ones(rows, cols, dtype=torch.bool)
        if tuple(mask.shape) != (rows, cols):
            raise ValueError(
                f"mask must be the block grid [{rows}, {cols}] for shape {(n, k)} and block "
                f"{(bn, bk)}, got {tuple(mask.shape)}"
            )
        keep = mask.to(device=dense.device) != 0
        padded = _pad_to_blocks(dense, bn, bk).reshape(rows, bn, cols, bk).transpose(1, 2)
        values = padded[keep].contiguous()  # row-major order of the block grid
        row_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=dense.device)
        row_offsets[1:] = torch.cumsum(keep.sum(1), 0)
        col_indices = keep.nonzero()[:, 1].to(torch.int64)
        return cls(values, row_offsets, col_indices, (n, k))

    def block_mask(self) -> torch.Tensor:
        """Boolean ``[ceil(N/bn), ceil(K/bk)]`` grid of the stored blocks."""
        rows, cols = self.grid
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        mask[block_row_ids(self.row_offsets), self.col_indices] = True
        return mask

    def _block_weight_counts(self) -> torch.Tensor:
        """Real (unpadded) weights in each block of the grid."""
        return block_weight_counts(self.shape, self.block_size).to(self.device)

    def to_dense(self) -> torch.Tensor:
        """The ``(N, K)`` dense weight, zeros outside the stored blocks."""
        rows, cols = self.grid
        bn, bk = self.block_size
        blocks = self.values.new_zeros(rows, cols, bn, bk)
        blocks[self.block_mask()] = self.values
        n, k = self.shape
        return blocks.transpose(1, 2).reshape(rows * bn, cols * bk)[:n, :k].contiguous()

    def to_sparse_bsr(self) -> torch.Tensor:
        """A ``torch.sparse_bsr`` tensor with the same pattern.

        torch's BSR needs the block size to divide the shape, so this requires ``N % bn == 0``
        and ``K % bk == 0``.
        """
        (n, k), (bn, bk) = self.shape, self.block_size
        if n % bn or k % bk:
            raise ValueError(
                f"torch.sparse_bsr needs the block size {(bn, bk)} to divide the shape {(n, k)}"
            )
        return torch.sparse_bsr_tensor(
            self.row_offsets, self.col_indices, self.values, size=(n, k)
        )

    @classmethod
    def from_sparse_bsr(cls, bsr: torch.Tensor) -> BlockSparseWeight:
        """Build from a 2-D ``torch.sparse_bsr`` tensor (indices converted to int64)."""
        if bsr.layout != torch.sparse_bsr:
            raise ValueError(f"expected a sparse_bsr tensor, got layout {bsr.layout}")
        if bsr.dim() != 2:
            raise ValueError(f"expected a 2-D sparse_bsr tensor, got {bsr.dim()}-D")
        return cls(
            bsr.values().contiguous(),
            bsr.crow_indices().to(torch.int64),
            bsr.col_indices().to(torch.int64),
            tuple(bsr.shape),
        )

    def with_values(self, values: torch.Tensor) -> BlockSparseWeight:
        """Same pattern, other values (no re-validation of the index)."""
        if values.shape != self.values.shape:
            raise ValueError(
                f"values must be {tuple(self.values.shape)}, got {tuple(values.shape)}"
            )
        return BlockSparseWeight(values, self.row_offsets, self.col_indices, self.shape,
                                 self.t_row_offsets, self.t_col_indices, self.t_block_ids,
                                 check=False)

    def to(self, *args, **kwargs) -> BlockSparseWeight:
        """Move to a device / cast values (indices stay int64)."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        return BlockSparseWeight(values, self.row_offsets.to(dev), self.col_indices.to(dev),
                                 self.shape, self.t_row_offsets.to(dev), self.t_col_indices.to(dev),
                                 self.t_block_ids.to(dev), check=False)

    def __repr__(self) -> str:
        return (f"BlockSparseWeight(shape={self.shape}, block_size={self.block_size}, "
                f"nnzb={self.nnzb}, density={self.density:.4f}, dtype={self.dtype})")


def block_weight_counts(shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """``[ceil(N/bn), ceil(K/bk)]`` count of real weights per block (tail blocks hold fewer)."""
    (n, k), (bn, bk) = shape, block_size
    rows, cols = math.ceil(n / bn), math.ceil(k / bk)
    row_sizes = torch.full((rows,), bn, dtype=torch.float64)
    col_sizes = torch.full((cols,), bk, dtype=torch.float64)
    if rows:
        row_sizes[-1] = n - (rows - 1) * bn
    if cols:
        col_sizes[-1] = k - (cols - 1) * bk
    return torch.outer(row_sizes, col_sizes)


def block_mask_for_density(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``round(density * numel)`` largest ``scores`` (ties: first)."""
    density = check_density(density)
    flat = scores.flatten()
    keep = round(density * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if keep:
        mask[torch.topk(flat.float(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _check_csr(offsets: torch.Tensor, indices: torch.Tensor, num_rows: int, bound: int,
               offsets_name: str, indices_name: str) -> None:
    for t, name in ((offsets, offsets_name), (indices, indices_name)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor")
    if offsets.numel() != num_rows + 1:
        raise ValueError(f"{offsets_name} must have {num_rows + 1} entries, got {offsets.numel()}")
    o = offsets.cpu()
    if int(o[0]) != 0:
        raise ValueError(f"{offsets_name}[0] must be 0, got {int(o[0])}")
    if bool((o.diff() < 0).any()):
        raise ValueError(f"{offsets_name} must be non-decreasing")
    if int(o[-1]) != indices.numel():
        raise ValueError(
            f"{offsets_name}[-1] = {int(o[-1])} must equal the number of stored blocks "
            f"{indices.numel()}"
        )
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"{indices_name} must lie in [0, {bound}), got values in [{lo}, {hi}]")
