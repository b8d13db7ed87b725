"""Sorting hidden units before a block mask is chosen (adsparse.pruning.permutation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adsparse.layout import block_mask_for_density
from adsparse.models import DLRM
from adsparse.pruning import (
    UnitOrder,
    apply_unit_orders_,
    magnitude_scores,
    permute_like,
    plan_unit_orders,
    sort_units_,
)


def _dlrm(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(5, [7, 3, 11, 4], embedding_dim=8, bottom_mlp=[21, 8],
                top_mlp=[37, 19, 1]).double()


def _inputs(model: DLRM, rows: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    dense = torch.randn(rows, model.num_dense, dtype=torch.double)
    ids = torch.stack([torch.randint(0, n, (rows,)) for n in model.embedding_sizes], dim=1)
    return dense, ids


def test_sorting_a_dlrm_keeps_its_function_and_orders_by_magnitude() -> None:
    model = _dlrm()
    x = _inputs(model)
    before = model(*x)
    sorted_model = copy.deepcopy(model)
    orders = sort_units_(sorted_model)
    torch.testing.assert_close(sorted_model(*x), before, rtol=1e-12, atol=1e-12)
    # Bottom 5-21-8 has one hidden layer, top 16+... -37-19-1 two, plus the top's pair inputs.
    assert sorted(uo.model_input or "" for uo in orders) == ["", "", "", "top_mlp.0"]
    top0, top2 = sorted_model.top_mlp[0], sorted_model.top_mlp[2]
    pairs = top0.weight[:, model.embedding_dim:].norm(dim=0)
    assert torch.all(pairs[:-1] >= pairs[1:])  # pair features now by decreasing norm
    hidden = top0.weight.norm(dim=1) * top2.weight.norm(dim=0)
    assert torch.all(hidden[:-1] >= hidden[1:])
    # The bottom output's columns stay first (they also enter the dot products); the rows
    # moved with the hidden units.
    rows = next(uo.order for uo in orders if ("top_mlp.0.weight", 0) in uo.dims)
    torch.testing.assert_close(top0.weight[:, :8], model.top_mlp[0].weight[rows, :8])
    assert not torch.equal(sorted_model.pair_index, model.pair_index)
    assert torch.equal(sorted_model.pair_index.sort().values, model.pair_index.sort().values)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh])
def test_hidden_units_of_a_plain_mlp_with_odd_widths(act: type[nn.Module]) -> None:
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(13, 29), act(), nn.Linear(29, 17, bias=False), act(),
                        nn.Dropout(0.0), nn.Linear(17, 3)).double()
    x = torch.randn(6, 13, dtype=torch.double)
    want = mlp(x)
    orders = sort_units_(mlp)
    assert [uo.order.numel() for uo in orders] == [29, 17]
    assert all(uo.model_input is None for uo in orders)  # a Sequential's inputs stay put
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


def test_a_non_elementwise_module_breaks_the_chain() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4), nn.ReLU(),
                        nn.Linear(4, 2))
    orders = plan_unit_orders(mlp)
    # LayerNorm mixes units: only the 4 units between the last two layers may move.
    assert [uo.order.numel() for uo in orders] == [4]
    assert {name for name, _ in orders[0].dims} == {"2.weight", "2.bias", "4.weight"}


def test_sorting_concentrates_scattered_inputs_into_few_blocks() -> None:
    # A layer that needs 24 of 384 inputs, one in every 16: every 16-wide column block holds
    # one, so at block density 1/8 each row block sees 3 of them. Sorted, they fill 2 blocks.
    torch.manual_seed(2)
    model = DLRM(4, [5] * 27, embedding_dim=16, bottom_mlp=[16], top_mlp=[64, 32, 1])
    top0 = model.top_mlp[0]
    with torch.no_grad():
        top0.weight.mul_(0.01)
        needed = 16 + torch.arange(0, 378, 16)[:24]
        top0.weight[:, needed] = torch.randn(64, 24)

    def kept_share(layer: nn.Linear) -> float:
        w = layer.weight.detach()
        mask = block_mask_for_density(magnitude_scores(w, (16, 16)), 0.125)
        elem = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)[: w.shape[0], : w.shape[1]]
        return float((w * elem).square().sum() / w.square().sum())

    before = kept_share(top0)
    sort_units_(model)
    after = kept_share(model.top_mlp[0])
    assert before < 0.3 and after > 0.85, (before, after)


def test_permute_like_reorders_optimizer_state_like_the_parameters() -> None:
    model = _dlrm(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(*_inputs(model)).sum().backward()
    opt.step()
    names = {p: n for n, p in model.named_parameters()}
    moved = copy.deepcopy(model)
    orders = sort_units_(moved)
    moved_params = dict(moved.named_parameters())
    for p, state in opt.state.items():
        name = names[p]
        # The moments of a reordered parameter follow it exactly as its values did.
        perm_value = permute_like(name, p.detach(), orders)
        torch.testing.assert_close(perm_value, moved_params[name].detach(), rtol=0, atol=0)
        assert permute_like(name, state["exp_avg"], orders).shape == p.shape


def test_dlrm_input_reordering_checks_its_arguments() -> None:
    model = _dlrm()
    n = model.pair_index.numel()
    with pytest.raises(ValueError, match="permutation"):
        model.permute_inputs_("top_mlp.0", torch.zeros(n, dtype=torch.long))
    with pytest.raises(ValueError, match="permutation"):
        model.permute_inputs_("top_mlp.0", torch.arange(n - 1))
    with pytest.raises(ValueError, match="inputs of"):
        model.permute_inputs_("bottom_mlp.0", torch.arange(5))
    order = UnitOrder(torch.arange(3), [("0.weight", 1)], model_input="0")
    with pytest.raises(TypeError, match="cannot reorder"):
        apply_unit_orders_(nn.Sequential(nn.Linear(3, 2)), [order])


def test_dlrm_state_dict_carries_the_pair_order_and_old_ones_still_load() -> None:
    model = _dlrm(4)
    sort_units_(model)
    x = _inputs(model)
    fresh = _dlrm(5)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(*x), model(*x), rtol=0, atol=0)
    # A state dict from before the order was saved loads with the triangle order.
    old = {k: v for k, v in _dlrm(6).state_dict().items() if k != "pair_index"}
    fresh.load_state_dict(old)
    assert torch.equal(fresh.pair_index, _dlrm(6).pair_index)
    bad = dict(model.state_dict(), pair_index=torch.zeros_like(model.pair_index))
    with pytest.raises(RuntimeError, match="not a reordering"):
        fresh.load_state_dict(bad)
