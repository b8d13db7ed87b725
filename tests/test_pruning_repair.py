"""The least-squares repair that ``learned`` measures block cuts with (pruning/repair.py).

``repaired`` is held to a float64 reference solved row by row from the raw inputs (one small
least-squares problem per row, no bucketing, no choice between the two forms), on odd shapes
with tail blocks, at densities that take the kept-set form, the removed-set (optimal brain
surgeon) form and both in one call; and the pruner's measurements with it on planted inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adsparse.nn import expand_block_mask
from adsparse.pruning import LearnedConfig, Pruner, repair
from adsparse.pruning.repair import InputStats, realize_, repaired
from adsparse.pruning.schedules import cubic_density

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(weight: torch.Tensor, x: torch.Tensor, keep: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row in float64: ``W'_S = W_S + A_SS^-1 A_SR W_R`` with ``A`` the inputs'
    covariance plus the ridge, ``W'`` zero outside ``keep`` ([N, K]); the shift keeps the mean
    output."""
    xd = x.double()
    mu = xd.mean(0)
    xc = xd - mu
    a = xc.T @ xc / x.shape[0]
    a = a + repair.RIDGE * a.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    w = weight.double()
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s, r = keep[i].nonzero().flatten(), (~keep[i]).nonzero().flatten()
        if len(s):
            out[i, s] = w[i, s] + torch.linalg.solve(a[s][:, s], a[s][:, r] @ w[i, r])
    return out, (w - out) @ mu


@pytest.mark.parametrize(("n", "k", "block", "density"), [
    (37, 29, (8, 4), 0.2),    # kept sets small: the kept-set form
    (37, 29, (8, 4), 0.85),   # kept sets large: the removed-set form
    (53, 41, (16, 16), 0.5),  # both forms in one call, tail blocks both ways
    (20, 13, None, 0.6),      # elements: one row per "row block"
    (19, 23, (4, 8), 1.0),    # nothing cut: W back, no shift
    (19, 23, (4, 8), 0.0),    # everything cut: zero, the whole mean output as the shift
])
def test_repaired_matches_a_rowwise_float64_reference(n, k, block, density) -> None:
    torch.manual_seed(n * k)
    x = torch.randn(300, k) @ torch.randn(k, k) / k ** 0.5 + torch.randn(k)
    weight = torch.randn(n, k)
    grid = (n, k) if block is None else (-(-n // block[0]), -(-k // block[1]))
    cut = torch.rand(grid) < density
    stats = InputStats(k)
    stats.add(x[:100])
    stats.add(x[100:])  # in two parts, as the pruner feeds it batch by batch
    got, shift = repaired(weight, cut, block, stats)
    keep = cut if block is None else expand_block_mask(cut, block, (n, k))
    want, want_shift = reference(weight, x, keep)
    assert got.dtype == weight.dtype and got.shape == weight.shape
    assert bool((got[~keep] == 0).all())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shift.double(), want_shift, atol=1e-4, rtol=1e-4)
    if density == 1.0:
        torch.testing.assert_close(got, weight)


@pytest.mark.parametrize(("n", "k", "block"), [(53, 41, (16, 16)), (37, 29, (8, 4)),
                                               (20, 13, None)])
def test_repaired_nested_matches_the_reference_for_every_cut(n, k, block) -> None:
    """Nested cuts (the top groups of one ranking, as a profile's points: densities that take
    either form, and nothing cut) share their factorizations; a cut that is not nested with
    them (another ranking) is refit alone. Each matches the float64 reference."""
    torch.manual_seed(n + k)
    x = torch.randn(300, k) @ torch.randn(k, k) / k ** 0.5 + torch.randn(k)
    weight = torch.randn(n, k)
    grid = (n, k) if block is None else (-(-n // block[0]), -(-k // block[1]))
    rank = torch.rand(grid)
    nested = [rank < q for q in (1.01, 0.9, 0.6, 0.45, 0.2, 0.05)]
    other = torch.rand(grid) < 0.5
    stats = InputStats(k)
    stats.add(x)
    cuts = [nested[2], other, *nested[:2], *nested[3:]]
    got = repair.repaired_nested(weight, cuts, block, stats)
    assert len(got) == len(cuts)
    for cut, (fit, shift) in zip(cuts, got):
        keep = cut if block is None else expand_block_mask(cut, block, (n, k))
        want, want_shift = reference(weight, x, keep)
        assert bool((fit[~keep] == 0).all())
        torch.testing.assert_close(fit.double(), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shift.double(), want_shift, atol=1e-4, rtol=1e-4)


def test_input_stats_are_the_mean_and_population_covariance() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 70, 9) * 2 + 1  # leading dims are flattened, as a layer's input
    stats = InputStats(9)
    stats.add(x)
    flat = x.reshape(-1, 9).double()
    torch.testing.assert_close(stats.mean, flat.mean(0))
    torch.testing.assert_close(stats.cov, torch.cov(flat.T, correction=0))


def test_repair_recovers_a_cut_input_from_its_copy() -> None:
    """Every input of the layer comes twice (x and a copy), so whatever a cut removes the kept
    copy can carry: repaired, the profile of that layer is nearly flat; raw cuts cost."""
    torch.manual_seed(0)

    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(32, 32))
            self.head = nn.Linear(32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(torch.cat([x, x], 1)))).squeeze(-1)

    model = Doubled()
    with torch.no_grad():  # the copies' weights are a third of the originals': magnitude cuts
        w = model.body[0].weight  # take the copies first, and the originals can carry them
        w[:, 16:] = w[:, :16] / 3
    x = torch.randn(512, 16)
    y = model(x).detach() + 0.1 * torch.randn(512)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]

    def mse(m: nn.Module, batch) -> torch.Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    worst = {}
    for fix in (False, True):
        pruner = Pruner(model, 0.5, "learned", "block", (8, 8), min_layer_density=0.02,
                        filter_fn=lambda m, fqn: fqn == "body.0",
                        learned=LearnedConfig(repair=fix, compensate=False))
        pruner.prune(batches, mse, steps=0)
        profile = next(h["profile"] for h in pruner.history if "profile" in h)
        # cuts down to half: the copies' blocks
        worst[fix] = max(c for removed, c in profile if removed <= 0.5 * 32 * 32 + 1e-6)
    assert worst[False] > 1e-3
    assert worst[True] < 0.05 * worst[False], worst


def test_repaired_joint_cuts_of_a_constant_input_cost_nothing() -> None:
    """Block granularity: every row of the batches is one input, so every layer's input is its
    mean and the shift alone restores any cut exactly; the joint check's costs are zero with
    ``repair``, not without it (nor with ``compensate``, which block cuts then do not take)."""
    torch.manual_seed(0)
    x = torch.randn(1, 16).expand(64, 16).contiguous()
    batches = [(x, torch.randn(64, 1)) for _ in range(4)]

    def mse(m: nn.Module, batch) -> torch.Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    costs = {}
    for fix in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 1))
        pruner = Pruner(model, 0.3, "learned", "block", (8, 8), min_layer_density=0.02,
                        filter_fn=lambda m, fqn: fqn in ("0", "2"),
                        learned=LearnedConfig(repair=fix, compensate=False))
        pruner.prune(batches, mse, steps=0)
        costs[fix] = [c for h in pruner.history if "costs" in h for c in h["costs"].values()]
    assert max(abs(c) for c in costs[False]) > 1e-3  # (an untrained model: cuts may help)
    assert max(abs(c) for c in costs[True]) < 1e-6


class _Target:
    """What realize_ needs of a pruning target: a module with weight and bias."""

    def __init__(self, n: int, k: int, block, bias: bool = True) -> None:
        self.module = nn.Linear(k, n, bias=bias)
        self.block_size = block

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


@pytest.mark.parametrize(("n", "k", "block"), [(37, 29, (8, 4)), (53, 41, (16, 16)),
                                               (12, 10, None)])
def test_realize_applies_the_refit_and_keeps_the_cut_values(n, k, block) -> None:
    """The kept weights become ``repaired``'s and the bias takes its shift; the cut weights
    keep their values (masked); a target whose mask did not change is left alone."""
    torch.manual_seed(n + k)
    x = torch.randn(400, k) @ torch.randn(k, k) / k ** 0.5 + torch.randn(k)
    stats = InputStats(k)
    stats.add(x)
    grid = (n, k) if block is None else (-(-n // block[0]), -(-k // block[1]))
    first = torch.rand(grid) < 0.8
    last = first & (torch.rand(grid) < 0.6)
    keep = (lambda m: m) if block is None else (lambda m: expand_block_mask(m, block, (n, k)))
    moved, still = _Target(n, k, block), _Target(n, k, block, bias=False)
    w0, b0, s0 = (moved.weight.detach().clone(), moved.module.bias.detach().clone(),
                  still.weight.detach().clone())
    realize_([moved, still], [first, first], [last, first], [stats, stats])
    want, shift = repaired(w0 * keep(first).float(), last, block, stats)
    torch.testing.assert_close(moved.weight[keep(last)], want[keep(last)])
    torch.testing.assert_close(moved.module.bias, b0 + shift)
    gone = ~keep(last)
    assert torch.equal(moved.weight[gone], w0[gone])
    assert torch.equal(still.weight, s0)


@pytest.mark.parametrize("realize", [False, True])
@pytest.mark.parametrize("ahead", [False, True])
def test_realizing_transition_moves_masks_every_realize_steps(realize, ahead) -> None:
    """While realizing, the masks move every ``realize_steps`` steps at most often (each move
    refits every cut layer): at the end of each interval, or with ``cut_ahead`` at its start
    (the first step already cut) to where the schedule is at its end; without realize, every
    ``update_every`` step. All end on the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))
    x = torch.randn(512, 16)
    batches = [(x[i:i + 64], torch.randn(64, 1)) for i in range(0, 512, 64)]

    def mse(m: nn.Module, batch) -> torch.Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    pruner = Pruner(model, 0.4, "learned", "block", (8, 8), min_layer_density=0.02,
                    filter_fn=lambda m, fqn: fqn in ("0", "2"),
                    learned=LearnedConfig(realize=realize, realize_steps=12, rounds=1,
                                          cut_ahead=ahead))
    pruner.prune(batches, mse, steps=48)
    records = [h for h in pruner.history if "step" in h]
    moved = [r["step"] + 1 for prev, r in itertools.pairwise(records)
             if r["density"] != prev["density"]]
    assert moved
    if realize and ahead:
        assert records[0]["density"] < 1.0
        assert all(s % 12 == 1 for s in moved), moved
        assert records[11]["density"] <= cubic_density(12, 48, 0.4) + 0.05
    elif realize:
        assert records[0]["density"] == 1.0
        assert all(s % 12 == 0 for s in moved), moved
    else:
        assert any(s % 12 for s in moved), moved
    assert pruner.global_density() == pytest.approx(0.4, abs=64 / (16 * 32 + 32 * 32))
