"""adsparse::dot_interaction (the DLRM's interaction for inference) against float64 references."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_f32_close

from adsparse.interaction import dot_interaction
from adsparse.models import DLRM, dlrm_preset


def _case(b: int, d: int, rows: list[int], shuffle: bool = True):
    bottom = torch.randn(b, d)
    tables = [torch.randn(r, d) for r in rows]
    ids = torch.stack([torch.randint(0, r, (b,)) for r in rows], dim=1) if rows else \
        torch.zeros(b, 0, dtype=torch.long)
    n = len(rows) + 1
    i, j = torch.triu_indices(n, n, offset=1)
    pairs = i * n + j
    if shuffle:  # a reordered DLRM (adsparse.pruning.sort_units_) reads them in any order
        pairs = pairs[torch.randperm(pairs.numel())]
    return bottom, ids, tables, pairs


def _reference(bottom, ids, tables, pairs, dtype):
    vectors = torch.stack([bottom.to(dtype)] + [t.to(dtype)[ids[:, f]]
                                                for f, t in enumerate(tables)], dim=1)
    gram = (vectors @ vectors.transpose(1, 2)).flatten(1)
    return torch.cat([bottom.to(dtype), gram[:, pairs]], dim=1)


@pytest.mark.parametrize("b, d, rows", [
    (1, 16, [5, 3]),
    (7, 13, [3, 9, 4, 11, 2]),
    (33, 64, [20] * 26),
    (17, 17, [1, 8, 30]),
    (5, 1, [4]),
    (9, 70, [6, 6, 6]),
    (4, 32, [3] * 40),  # 41 vectors: tiles of every shape past the diagonal
])
def test_matches_float64_on_every_isa(cpu_isa, b, d, rows) -> None:
    bottom, ids, tables, pairs = _case(b, d, rows)
    out = dot_interaction(bottom, ids, tables, pairs)
    assert_f32_close(out, _reference(bottom, ids, tables, pairs, torch.float64),
                     _reference(bottom, ids, tables, pairs, torch.float32))
    torch.testing.assert_close(out[:, :d], bottom, rtol=0, atol=0)  # copied, not computed


def test_any_pair_order_repeats_and_the_diagonal(cpu_isa) -> None:
    bottom, ids, tables, _ = _case(6, 24, [7, 5, 9])
    pairs = torch.tensor([0, 5, 5, 15, 3, 12, 10, 1, 6, 14, 13, 2, 7, 9, 11, 4, 8, 0, 15, 3])
    out = dot_interaction(bottom, ids, tables, pairs)
    assert_f32_close(out, _reference(bottom, ids, tables, pairs, torch.float64),
                     _reference(bottom, ids, tables, pairs, torch.float32))


def test_empty_batch_no_pairs_and_views() -> None:
    bottom, ids, tables, pairs = _case(0, 16, [3, 4])
    assert dot_interaction(bottom, ids, tables, pairs).shape == (0, 16 + pairs.numel())
    bottom, ids, tables, _ = _case(4, 16, [3, 4])
    assert dot_interaction(bottom, ids, tables, torch.zeros(0, dtype=torch.long)).shape == (4, 16)
    # Non-contiguous bottom, ids and tables are read through copies.
    wide = torch.randn(4, 40)
    tables_t = [torch.randn(16, 3).t(), torch.randn(16, 4).t()]
    ids_t = torch.stack([torch.randint(0, 3, (4,)), torch.randint(0, 4, (4,))], 0).t()
    pairs = torch.tensor([1, 2, 5])
    out = dot_interaction(wide[:, ::2][:, :16], ids_t, tables_t, pairs)
    want = _reference(wide[:, ::2][:, :16].contiguous(), ids_t.contiguous(),
                      [t.contiguous() for t in tables_t], pairs, torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_opcheck() -> None:
    for args in (_case(5, 16, [4, 3, 6]), _case(3, 7, [2])):
        torch.library.opcheck(torch.ops.adsparse.dot_interaction.default, args)


def test_bad_input_raises_naming_the_argument() -> None:
    bottom, ids, tables, pairs = _case(3, 8, [4, 5])
    bad_id = ids.clone()
    bad_id[2, 1] = 5
    cases = [
        ((bottom.double(), ids, tables, pairs), "bottom must be float32"),
        ((bottom[0], ids, tables, pairs), "bottom must be"),
        ((bottom, ids.int(), tables, pairs), "ids must be a CPU int64"),
        ((bottom, ids[:2], tables, pairs), r"ids must be \[3, F\]"),
        ((bottom, ids, tables[:1], pairs), "2 fields but there are 1 tables"),
        ((bottom, ids, [tables[0], torch.randn(5, 7)], pairs), r"tables\[1\] must be"),
        ((bottom, bad_id, tables, pairs), r"ids\[2, 1\] = 5 is out of range \[0, 5\)"),
        ((bottom, -ids - 1, tables, pairs), "out of range"),
        ((bottom, ids, tables, torch.tensor([9])), r"pair_index\[0\] = 9 is out of range"),
        ((bottom, ids, tables, pairs.int()), "pair_index must be int64"),
        ((bottom[:1], torch.zeros(1, 1024, dtype=torch.long), [torch.randn(1, 8)] * 1024,
          torch.tensor([1])), "at most 1023 fields, got 1024"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            dot_interaction(*args)


def test_inference_only() -> None:
    bottom, ids, tables, pairs = _case(3, 8, [4, 5])
    bottom.requires_grad_(True)
    out = dot_interaction(bottom, ids, tables, pairs)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_dlrm_takes_the_op_without_autograd_and_the_same_numbers(monkeypatch) -> None:
    model = DLRM(5, [7, 3, 11, 4], embedding_dim=16, bottom_mlp=[21, 16], top_mlp=[37, 19, 1])
    dense = torch.randn(9, 5)
    ids = torch.stack([torch.randint(0, n, (9,)) for n in model.embedding_sizes], dim=1)
    trained = model(dense, ids)
    calls = []
    real = torch.ops.adsparse.dot_interaction
    monkeypatch.setattr("adsparse.interaction._OPS", type(
        "Ops", (), {"dot_interaction": staticmethod(lambda *a: calls.append(1) or real(*a))}))
    with torch.no_grad():
        served = model(dense, ids)
    with torch.inference_mode():
        torch.testing.assert_close(model(dense, ids), served, rtol=0, atol=0)
    assert len(calls) == 2 and trained.requires_grad
    torch.testing.assert_close(served, trained.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # float64 models keep the composite path
        model.double()(dense.double(), ids)
    assert len(calls) == 2


def test_dlrm_inference_compiles_and_exports() -> None:
    model = dlrm_preset("kaggle", 13, [50] * 26).eval()
    dense, ids = torch.randn(8, 13), torch.randint(0, 50, (8, 26))
    with torch.no_grad():
        want = model(dense, ids)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(dense, ids), want)
        exported = torch.export.export(model, (dense, ids))
        torch.testing.assert_close(exported.module()(dense, ids), want)
