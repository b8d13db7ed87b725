"""BlockSparseWeight: packing, conversions, transposed index, and rejection of corrupt metadata."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_block_mask, random_bsr

from adsparse.layout import BlockSparseWeight, block_norms

BLOCKS = [(16, 16), (32, 32), (1, 16), (8, 4), (3, 5)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]
# Odd shapes: tails in both dimensions for every block size above, plus one exact fit.
SHAPES = [(13, 7), (50, 37), (64, 48)]


def _grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _dense_masked(dense: torch.Tensor, mask: torch.Tensor, block: tuple[int, int]):
    """``dense`` with the blocks outside ``mask`` zeroed, built element by element in float64."""
    bn, bk = block
    keep = mask.bool().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return dense.double() * keep[: dense.shape[0], : dense.shape[1]]


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_from_dense_mask_round_trip(shape, block, density):
    dense = torch.randn(shape)
    mask = random_block_mask(_grid(shape, block), density)
    w = BlockSparseWeight.from_dense(dense, block, mask=mask)
    assert w.shape == shape and w.block_size == block
    assert w.nnzb == int(mask.sum())
    assert torch.equal(w.block_mask(), mask)
    assert torch.equal(w.to_dense().double(), _dense_masked(dense, mask, block))
    # Tail blocks are zero-padded inside values.
    bn, bk = block
    padded = torch.zeros(w.grid[0] * bn, w.grid[1] * bk)
    padded[: shape[0], : shape[1]] = 1
    pad_region = padded.view(w.grid[0], bn, w.grid[1], bk).transpose(1, 2)[mask] == 0
    assert bool((w.values[pad_region] == 0).all())
    # Blocks are packed in row-major order of the grid, columns strictly increasing per row.
    rows = torch.repeat_interleave(torch.arange(w.grid[0]), w.row_offsets.diff())
    order = rows * w.grid[1] + w.col_indices
    assert bool((order.diff() > 0).all())
    w.validate()


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", DENSITIES)
def test_from_dense_density_keeps_largest_blocks(block, density):
    shape = (50, 37)
    dense = torch.randn(shape)
    if density == 0:  # density is in (0, 1] everywhere (adsparse.checks); a zero mask packs none
        with pytest.raises(ValueError, match="density"):
            BlockSparseWeight.from_dense(dense, block, density=density)
        return
    w = BlockSparseWeight.from_dense(dense, block, density=density)
    rows, cols = _grid(shape, block)
    assert w.nnzb == round(density * rows * cols)
    norms = block_norms(dense, block)
    # Reference norms in float64, block by block.
    bn, bk = block
    for r in range(rows):
        for c in range(cols):
            blk = dense[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk].double()
            assert math.isclose(float(norms[r, c]), float(blk.norm()), rel_tol=1e-5)
    kept = w.block_mask()
    if 0 < w.nnzb < rows * cols:
        assert float(norms[kept].min()) >= float(norms[~kept].max())
    assert torch.equal(w.to_dense().double(), _dense_masked(dense, kept, block))


def test_from_dense_density_exact_count_small_example():
    # 4 x 3 grid of 2x2 blocks whose norms are known: keep the 3 largest at density 0.25.
    scale = torch.arange(12, dtype=torch.float32).view(4, 3)
    dense = scale.repeat_interleave(2, 0).repeat_interleave(2, 1)
    w = BlockSparseWeight.from_dense(dense, (2, 2), density=0.25)
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[3, :] = True  # blocks 9, 10, 11
    assert torch.equal(w.block_mask(), expected)
    assert w.density == pytest.approx(0.25)


def test_from_dense_default_keeps_everything_and_bad_arguments():
    dense = torch.randn(13, 7)
    w = BlockSparseWeight.from_dense(dense, (8, 4))
    assert w.nnzb == 2 * 2 and w.density == 1.0
    assert torch.equal(w.to_dense(), dense)
    with pytest.raises(ValueError, match="mask or density"):
        BlockSparseWeight.from_dense(dense, (8, 4), mask=torch.ones(2, 2), density=0.5)
    with pytest.raises(ValueError, match="mask must be the block grid"):
        BlockSparseWeight.from_dense(dense, (8, 4), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseWeight.from_dense(dense, (0, 4))
    with pytest.raises(ValueError, match="density"):
        BlockSparseWeight.from_dense(dense, (8, 4), density=1.5)
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseWeight.from_dense(torch.randn(3, 4, 5), (1, 1))


@pytest.mark.parametrize(("block", "density"), [((16, 16), 0.05), ((3, 5), 0.5), ((8, 4), 1.0),
                                                ((1, 16), 0.0)])
def test_density_and_nbytes(block, density):
    shape = (50, 37)
    w = random_bsr(*shape, block, density)
    bn, bk = block
    # density counts only the real (unpadded) weights inside stored blocks.
    real = _dense_masked(torch.ones(shape), w.block_mask(), block)
    assert w.density == pytest.approx(float(real.sum()) / (shape[0] * shape[1]))
    rows, cols = w.grid
    expected = (w.nnzb * bn * bk * 4  # float32 values
                + 8 * ((rows + 1) + w.nnzb  # row_offsets, col_indices
                       + (cols + 1) + 2 * w.nnzb))  # t_row_offsets, t_col_indices, t_block_ids
    assert w.nbytes == expected


# --------------------------------------------------------------------------- transposed index
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_transposed_index_matches_transposed_pattern(block, density):
    w = random_bsr(50, 37, block, density)
    rows, cols = w.grid
    assert w.t_row_offsets.numel() == cols + 1
    mask = w.block_mask()
    block_rows = torch.repeat_interleave(torch.arange(rows), w.row_offsets.diff())
    for c in range(cols):
        lo, hi = int(w.t_row_offsets[c]), int(w.t_row_offsets[c + 1])
        ids = w.t_block_ids[lo:hi]
        # Block rows of column c, increasing, exactly the stored ones.
        assert torch.equal(w.t_col_indices[lo:hi], mask[:, c].nonzero().flatten())
        # Each id points at a stored block of that column and that row.
        assert bool((w.col_indices[ids] == c).all())
        assert torch.equal(block_rows[ids], w.t_col_indices[lo:hi])
    assert torch.equal(torch.sort(w.t_block_ids).values, torch.arange(w.nnzb))
    # The transposed index describes W^T: packing W^T directly gives the same blocks.
    wt = BlockSparseWeight.from_dense(w.to_dense().t(), (block[1], block[0]), mask=mask.t())
    assert torch.equal(wt.col_indices, w.t_col_indices)
    assert torch.equal(wt.values, w.values[w.t_block_ids].transpose(1, 2))


# --------------------------------------------------------------------------- torch.sparse_bsr
@pytest.mark.parametrize(("shape", "block"), [((64, 48), (16, 16)), ((64, 64), (32, 32)),
                                              ((13, 32), (1, 16)), ((16, 12), (8, 4)),
                                              ((15, 20), (3, 5))])
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_bsr_round_trip(shape, block, density):
    w = random_bsr(*shape, block, density)
    bsr = w.to_sparse_bsr()
    assert bsr.layout == torch.sparse_bsr and tuple(bsr.shape) == shape
    assert torch.equal(bsr.to_dense(), w.to_dense())
    back = BlockSparseWeight.from_sparse_bsr(bsr)
    for name in ("values", "row_offsets", "col_indices", "t_row_offsets", "t_col_indices",
                 "t_block_ids"):
        assert torch.equal(getattr(back, name), getattr(w, name)), name
    assert back.shape == w.shape and back.block_size == w.block_size


def test_sparse_bsr_from_torch_with_int32_indices():
    dense = torch.randn(32, 48)
    dense[:16, 16:32] = 0
    bsr = dense.to_sparse_bsr((16, 16))
    w = BlockSparseWeight.from_sparse_bsr(bsr)
    assert w.row_offsets.dtype == torch.int64
    assert torch.equal(w.to_dense(), bsr.to_dense())
    bsr32 = torch.sparse_bsr_tensor(bsr.crow_indices().int(), bsr.col_indices().int(),
                                    bsr.values(), size=bsr.shape)
    assert torch.equal(BlockSparseWeight.from_sparse_bsr(bsr32).to_dense(), bsr.to_dense())


@pytest.mark.parametrize(("shape", "block"), [((13, 7), (8, 4)), ((16, 20), (16, 16)),
                                              ((50, 37), (3, 5))])
def test_sparse_bsr_needs_divisible_shape(shape, block):
    w = random_bsr(*shape, block, 0.5)
    with pytest.raises(ValueError, match="divide the shape"):
        w.to_sparse_bsr()


def test_from_sparse_bsr_rejects_other_layouts():
    with pytest.raises(ValueError, match="sparse_bsr"):
        BlockSparseWeight.from_sparse_bsr(torch.randn(4, 4))
    with pytest.raises(ValueError, match="sparse_bsr"):
        BlockSparseWeight.from_sparse_bsr(torch.randn(4, 4).to_sparse_csr())


# --------------------------------------------------------------------------- corrupt metadata
def _parts(w: BlockSparseWeight) -> dict:
    return {"values": w.values.clone(), "row_offsets": w.row_offsets.clone(),
            "col_indices": w.col_indices.clone(), "shape": w.shape}


def _corrupt(name: str, w: BlockSparseWeight) -> dict:
    """Constructor arguments for ``w`` with one kind of corruption; see CORRUPTIONS."""
    p = _parts(w)
    ro, ci = p["row_offsets"], p["col_indices"]
    if name == "offsets_not_monotone":
        first, second = int(ro[1]), int(ro[2])
        ro[1], ro[2] = second + 1, first
    elif name == "offsets_first_not_zero":
        ro[0] = 1
    elif name == "offsets_last_wrong":
        ro[-1] -= 1
    elif name == "offsets_wrong_length":
        p["row_offsets"] = torch.cat([ro, ro[-1:]])
    elif name == "column_out_of_range":
        ci[-1] = w.grid[1]
    elif name == "column_negative":
        ci[0] = -1
    elif name == "columns_unsorted":
        ci[0], ci[1] = ci[1].clone(), ci[0].clone()
    elif name == "columns_duplicate":
        ci[1] = ci[0]
    elif name == "values_wrong_count":
        p["values"] = p["values"][:-1]
    elif name == "values_wrong_rank":
        p["values"] = p["values"].flatten(1)
    elif name == "index_int32":
        p["col_indices"] = ci.int()
    elif name == "offsets_int32":
        p["row_offsets"] = ro.int()
    elif name == "index_2d":
        p["col_indices"] = ci.view(1, -1)
    else:
        raise AssertionError(name)
    return p


CORRUPTIONS = {
    "offsets_not_monotone": "non-decreasing",
    "offsets_first_not_zero": r"row_offsets\[0\] must be 0",
    "offsets_last_wrong": r"row_offsets\[-1\]",
    "offsets_wrong_length": "row_offsets must have",
    "column_out_of_range": r"col_indices must lie in \[0, 3\)",
    "column_negative": "col_indices must lie in",
    "columns_unsorted": "strictly increasing",
    "columns_duplicate": "strictly increasing",
    "values_wrong_count": "values holds",
    "values_wrong_rank": r"values must be \[nnzb, bn, bk\]",
    "index_int32": "col_indices must be a 1-D int64",
    "offsets_int32": "row_offsets must be a 1-D int64",
    "index_2d": "col_indices must be a 1-D int64",
}


def _full_weight() -> BlockSparseWeight:
    # 3 x 3 grid of (5, 4) blocks with tails, every block stored: each row holds columns 0, 1, 2.
    return random_bsr(13, 11, (5, 4), 1.0)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_metadata_raises(name):
    w = _full_weight()
    with pytest.raises(ValueError, match=CORRUPTIONS[name]):
        BlockSparseWeight(**_corrupt(name, w))


@pytest.mark.parametrize("field", ["t_row_offsets", "t_col_indices", "t_block_ids"])
def test_bad_transposed_index_raises(field):
    w = random_bsr(13, 11, (5, 4), 0.5)
    t = {"t_row_offsets": w.t_row_offsets.clone(), "t_col_indices": w.t_col_indices.clone(),
         "t_block_ids": w.t_block_ids.clone()}
    if field == "t_row_offsets":
        t[field][1] += 1  # still monotone and bounded, but not this pattern's counts
    elif field == "t_col_indices":
        t[field][0] = (t[field][0] + 1) % w.grid[0]
    else:
        t[field] = t[field].flip(0)
    with pytest.raises(ValueError, match=r"transpos|t_row_offsets|t_col_indices|t_block_ids"):
        BlockSparseWeight(w.values, w.row_offsets, w.col_indices, w.shape, **t)


def test_transposed_index_bad_dtype_and_range():
    w = random_bsr(13, 11, (5, 4), 0.5)
    args = (w.values, w.row_offsets, w.col_indices, w.shape)
    with pytest.raises(ValueError, match="t_col_indices"):
        BlockSparseWeight(*args, w.t_row_offsets, w.t_col_indices.int(), w.t_block_ids)
    bad = w.t_col_indices.clone()
    bad[0] = w.grid[0]
    with pytest.raises(ValueError, match="t_col_indices must lie in"):
        BlockSparseWeight(*args, w.t_row_offsets, bad, w.t_block_ids)
    ids = w.t_block_ids.clone()
    ids[0] = ids[1]
    with pytest.raises(ValueError, match="t_block_ids"):
        BlockSparseWeight(*args, w.t_row_offsets, w.t_col_indices, ids)
    with pytest.raises(ValueError, match="transposed index is missing"):
        BlockSparseWeight(*args, w.t_row_offsets, None, None, check=False).validate()


def test_validate_catches_in_place_corruption():
    w = random_bsr(13, 11, (5, 4), 1.0)
    w.validate()
    w.col_indices[0] = 7
    with pytest.raises(ValueError, match="col_indices must lie in"):
        w.validate()


def test_negative_shape_and_zero_block_raise():
    with pytest.raises(ValueError, match="non-negative"):
        BlockSparseWeight(torch.zeros(0, 2, 2), torch.zeros(1, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64), (-1, 4))
    with pytest.raises(ValueError, match="block size"):
        BlockSparseWeight(torch.zeros(0, 0, 2), torch.zeros(1, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64), (4, 4))


def test_with_values_and_to_keep_the_pattern():
    w = random_bsr(13, 11, (5, 4), 0.5)
    v = torch.randn_like(w.values)
    w2 = w.with_values(v)
    assert w2.values is v and torch.equal(w2.block_mask(), w.block_mask())
    with pytest.raises(ValueError, match="values must be"):
        w.with_values(v[:, :1])
    w64 = w.to(torch.float64)
    assert w64.dtype == torch.float64 and w64.row_offsets.dtype == torch.int64
    assert torch.equal(w64.to_dense(), w.to_dense().double())
    assert "block_size=(5, 4)" in repr(w)


def test_strided_index_is_made_contiguous():
    """A weight built from index views (slices of other tensors) owns dense copies."""
    w = random_bsr(40, 30, (8, 4), 0.5)
    ro = torch.stack([w.row_offsets, w.row_offsets], 1)[:, 1]
    ci = torch.stack([w.col_indices, w.col_indices.flip(0)], 1)[:, 0]
    tb = torch.stack([w.t_block_ids, w.t_block_ids], 1)[:, 0]
    assert not (ro.is_contiguous() or ci.is_contiguous() or tb.is_contiguous())
    w2 = BlockSparseWeight(w.values, ro, ci, w.shape, w.t_row_offsets, w.t_col_indices, tb)
    for name in ("row_offsets", "col_indices", "t_block_ids"):
        assert getattr(w2, name).is_contiguous(), name
        assert torch.equal(getattr(w2, name), getattr(w, name)), name
