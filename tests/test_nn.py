"""SparseLinear, BlockSparseLinear, sparsify_/densify_: function, gradients, round trips."""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import pytest
import torch
from torch import nn

import adsparse
from adsparse.nn import BlockSparseLinear, SparseLinear, densify_, load_sparse_state_dict, sparsify_


def _mlp(seed: int, dims=(37, 50, 23, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (k, n) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(k, n))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _float64_reference(model: nn.Module) -> nn.Module:
    """The same function in float64, every sparse layer replaced by its masked dense nn.Linear."""
    ref = copy.deepcopy(model)
    for _, m in list(ref.named_modules()):
        if isinstance(m, SparseLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.masked_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            ref = adsparse.nn.replace_layer(ref, m, lin)
    densify_(ref)
    return ref.double()


@pytest.mark.parametrize("block_size", [(16, 16), (8, 4), (1, 16)])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_block_sparse_linear_matches_dense_reference(block_size, density):
    model = _mlp(1)
    sparsify_(model, density=density, block_size=block_size)
    ref = _float64_reference(model)
    x = torch.randn(7, 37)
    x64 = x.double().requires_grad_()
    x = x.clone().requires_grad_()
    y, y_ref = model(x), ref(x64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for layer, ref_layer in zip(model, ref):
        if isinstance(layer, BlockSparseLinear):
            expected = adsparse.BlockSparseWeight.from_dense(
                ref_layer.weight.grad, layer.block_size, mask=layer.block_mask()
            ).values
            torch.testing.assert_close(layer.values.grad.double(), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.bias.grad.double(), ref_layer.bias.grad,
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_sparse_linear_matches_masked_dense_reference(granularity):
    torch.manual_seed(2)
    layer = SparseLinear(29, 45, block_size=(8, 16), granularity=granularity)
    layer.set_mask((torch.rand(layer.mask_shape) < 0.4).float())
    lin = nn.Linear(29, 45).double()
    with torch.no_grad():
        lin.weight.copy_(layer.masked_weight())
        lin.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 29)
    y = layer(x)
    assert y.shape == (2, 3, 45)
    torch.testing.assert_close(y.double(), lin(x.double()), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    lin(x.double()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad.double(),
                               lin.weight.grad * layer.element_mask().double(),
                               rtol=1e-4, atol=1e-4)


def test_sparse_linear_shares_parameters_and_checks_mask_shape():
    lin = nn.Linear(20, 10)
    layer = SparseLinear.from_linear(lin, block_size=(4, 8))
    assert layer.weight is lin.weight and layer.mask_shape == (3, 3)
    assert layer.density == 1.0
    with pytest.raises(ValueError, match="mask must be"):
        layer.set_mask(torch.ones(2, 2))
    with pytest.raises(ValueError, match="granularity"):
        SparseLinear(4, 4, granularity="row")


def test_optimizer_state_only_for_stored_blocks():
    model = sparsify_(_mlp(3), density=0.25, block_size=(16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [m.block_mask().clone() for m in model if isinstance(m, BlockSparseLinear)]
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 37)).sum().backward()
        opt.step()
    layer = model[0]
    assert opt.state[layer.values]["exp_avg"].shape == layer.values.shape
    assert layer.values.shape[0] == layer.block_mask().sum()
    after = [m.block_mask() for m in model if isinstance(m, BlockSparseLinear)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "pattern must stay fixed"


def test_from_dense_sources_and_densify_round_trip():
    torch.manual_seed(4)
    lin = nn.Linear(33, 40)
    mask = torch.rand(3, 3) < 0.5
    mask[0, 0] = True
    bsl = BlockSparseLinear.from_dense(lin, mask=mask, block_size=16)
    assert torch.equal(bsl.block_mask(), mask)
    sl = SparseLinear.from_linear(lin, block_size=(16, 16), mask=mask.float())
    from_sparse = BlockSparseLinear.from_dense(sl, block_size=(16, 16))
    assert torch.equal(from_sparse.block_mask(), mask)
    x = torch.randn(5, 33)
    torch.testing.assert_close(from_sparse(x), sl(x))
    back = bsl.to_dense()
    assert isinstance(back, nn.Linear)
    torch.testing.assert_close(back(x), bsl(x))
    assert "density=" in repr(bsl) and "block_size=(16, 16)" in repr(bsl)
    with pytest.raises(ValueError, match="density"):
        BlockSparseLinear.from_dense(lin, density=0.0)


def test_sparsify_filter_masks_and_errors():
    model = _mlp(5)
    sparsify_(model, density=0.5, filter_fn=lambda m, fqn: fqn != "4")
    assert isinstance(model[0], BlockSparseLinear) and isinstance(model[4], nn.Linear)
    densify_(model)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())

    model = _mlp(5)
    masks = {"2": torch.ones(2, 4, dtype=torch.bool)}
    sparsify_(model, masks=masks)
    assert isinstance(model[2], BlockSparseLinear) and isinstance(model[0], nn.Linear)
    with pytest.raises(ValueError, match=r"not nn\.Linear"):
        sparsify_(_mlp(5), masks={"1": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="density or masks"):
        sparsify_(_mlp(5))
    with pytest.raises(ValueError, match="layer '0'"):
        sparsify_(_mlp(5), masks={"0": torch.ones(5, 5)})


def _assert_same_module(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), key
    x = torch.randn(4, 37)
    assert torch.equal(a(x), b(x))


def test_round_trips_are_bit_exact():
    model = sparsify_(_mlp(6), density=0.3)
    _assert_same_module(model, copy.deepcopy(model))
    _assert_same_module(model, pickle.loads(pickle.dumps(model)))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    _assert_same_module(model, torch.load(buf, weights_only=False))
    other = sparsify_(_mlp(6), density=0.3)  # same weights -> same pattern
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    _assert_same_module(model, other)


def test_load_state_dict_mismatch_names_the_layer():
    model = sparsify_(_mlp(7), density=0.3)
    different_pattern = sparsify_(_mlp(8), density=0.3)
    with pytest.raises(RuntimeError, match=r"BlockSparseLinear 0: .*pattern"):
        different_pattern.load_state_dict(model.state_dict())
    rebuilt = load_sparse_state_dict(different_pattern, model.state_dict())
    _assert_same_module(model, rebuilt)
    other_block = sparsify_(_mlp(7), density=0.3, block_size=(8, 8))
    with pytest.raises(RuntimeError, match=r"BlockSparseLinear 0: checkpoint has shape"):
        other_block.load_state_dict(model.state_dict())


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = sparsify_(_mlp(9), density=0.4)
    sparse_in = SparseLinear(3, 5, block_size=(2, 2))
    full = nn.Sequential(model, sparse_in)
    compiled = torch.compile(full, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 37, requires_grad=True)
    xc = x.detach().clone().requires_grad_()
    y, yc = full(x), compiled(xc)
    torch.testing.assert_close(yc, y)
    y.sum().backward()
    grads = [p.grad.clone() for p in full.parameters()]
    full.zero_grad()
    yc.sum().backward()
    torch.testing.assert_close(xc.grad, x.grad)
    for g, p in zip(grads, full.parameters()):
        torch.testing.assert_close(p.grad, g)


# --------------------------------------------------------------------------- reliability
def test_shared_layer_stays_shared_through_sparsify_and_densify():
    torch.manual_seed(20)
    tied = nn.Linear(32, 32)
    model = nn.Sequential(tied, nn.ReLU(), tied)
    x = torch.randn(5, 32)
    sparsify_(model, density=0.5)
    assert isinstance(model[0], BlockSparseLinear) and model[2] is model[0]
    assert len(list(model.parameters())) == 2  # one values, one bias: still tied
    model(x).sum().backward()
    assert model[0].values.grad is not None
    densify_(model)
    assert isinstance(model[0], nn.Linear) and model[2] is model[0]
    torch.testing.assert_close(model(x), model[2](torch.relu(model[0](x))))
    # masks may name a shared layer by any of its names
    model = nn.Sequential(tied, nn.ReLU(), tied)
    sparsify_(model, masks={"2": torch.tensor([[True, False], [False, True]])})
    assert model[0] is model[2] and model[0].block_mask().sum() == 2
    model = nn.Sequential(tied, nn.ReLU(), tied)
    with pytest.raises(ValueError, match="different masks"):
        sparsify_(model, masks={"0": torch.ones(2, 2), "2": torch.eye(2)})


def test_small_layer_keeps_at_least_one_block():
    torch.manual_seed(21)
    model = sparsify_(nn.Sequential(nn.Linear(64, 1)), density=0.1)  # round(0.4) = 0 blocks
    layer = model[0]
    assert layer.values.shape[0] == 1
    # the kept block is the one of largest norm
    lin = nn.Linear(64, 1)
    norms = lin.weight.detach().reshape(4, 16).norm(dim=1)
    kept = BlockSparseLinear.from_dense(lin, density=0.01)
    assert kept.block_mask()[0].nonzero().flatten().tolist() == [int(norms.argmax())]
    assert kept(torch.randn(3, 64)).abs().sum() > 0


def test_load_state_dict_rejects_other_transposed_index_or_activation():
    model = sparsify_(_mlp(22, dims=(48, 48)), density=0.5)
    state = model.state_dict()
    ids = state["0.t_block_ids"]
    assert ids.numel() >= 2
    altered = dict(state, **{"0.t_block_ids": ids.flip(0)})  # main index unchanged
    other = sparsify_(_mlp(22, dims=(48, 48)), density=0.5)
    with pytest.raises(RuntimeError, match=r"BlockSparseLinear 0: .*transposed index"):
        other.load_state_dict(altered)
    with pytest.raises(ValueError, match="transposed index"):
        load_sparse_state_dict(other, altered)
    relu = BlockSparseLinear(model[0].weight(), model[0].bias, activation="relu")
    with pytest.raises(RuntimeError, match="activation"):
        relu.load_state_dict(model[0].state_dict())


@pytest.mark.parametrize("build", [
    lambda: SparseLinear(4, 4, block_size=2**63),
    lambda: BlockSparseLinear.from_dense(nn.Linear(4, 4), block_size=2**63),
    lambda: sparsify_(nn.Sequential(nn.Linear(4, 4)), density=0.5, block_size=(2**63, 1)),
])
def test_absurd_block_size_is_a_value_error(build):
    with pytest.raises(ValueError, match="block_size must be integers in"):
        build()
