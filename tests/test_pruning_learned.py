"""The learned method: it finds a planted redundant layer, its thresholds get gradients, and it
warm-starts from the previous transition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adsparse.ops import masked_linear
from adsparse.pruning import LearnedThresholds, Pruner
from adsparse.pruning.learned import normalize_scores
from adsparse.pruning.scorers import magnitude_scores
from adsparse.pruning.targets import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")



class Planted(nn.Module):
    """Two parallel hidden layers of the same shape; ``dead``'s output is scaled by ~0."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 40)
        self.live = nn.Linear(40, 40)
        self.dead = nn.Linear(40, 40)
        self.out = nn.Linear(40, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.live(h)) + 1e-4 * torch.relu(self.dead(h))).squeeze(-1)


def planted_task(steps: int = 150) -> tuple[Planted, list]:
    """A small trained regression model: a random teacher, so every live layer matters."""
    teacher = nn.Sequential(nn.Linear(13, 24), nn.Tanh(), nn.Linear(24, 1))
    x = torch.randn(1024, 13)
    with torch.no_grad():
        y = 3 * teacher(x).squeeze(-1)
    model = Planted()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(steps):
        idx = torch.randint(0, 1024, (128,))
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        del i
    return model, [(x[i:i + 128], y[i:i + 128]) for i in range(0, 1024, 128)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def not_head(module: nn.Module, fqn: str) -> bool:
    return fqn != "out"


@pytest.mark.parametrize(("granularity", "scorer"),
                         [("block", "magnitude"), ("block", "taylor"), ("element", "magnitude")])
def test_learned_gives_the_planted_redundant_layer_a_lower_density(granularity, scorer) -> None:
    model, data = planted_task()
    pruner = Pruner(model, 0.3, "learned", granularity, (8, 8), min_layer_density=0.02,
                    filter_fn=not_head, scorer=scorer)
    pruner.prune(data, mse, steps=40)
    d = pruner.layer_densities()
    assert d["dead"] < 0.5 * min(d["inp"], d["live"]), d
    # Uniform (the hand-set baseline) gives every layer the same share.
    uniform = Pruner(model, 0.3, "uniform", granularity, (8, 8), filter_fn=not_head)
    uniform.prune()
    assert uniform.layer_densities()["dead"] == pytest.approx(0.3, abs=0.05)


def test_thresholds_receive_gradients_through_masked_linear() -> None:
    model, data = planted_task(steps=20)
    targets = find_targets(model, "block", (8, 8), not_head)
    scores = [normalize_scores(magnitude_scores(t.weight, t.block_size, t.sizes))
              for t in targets]
    thresholds = LearnedThresholds()
    thresholds.prepare(targets, scores, 0.3, tau=0.3)
    masks = thresholds.soft_masks(targets, scores, tau=0.3)
    # Density falls when any threshold rises.
    density = thresholds.density(targets, masks)
    grads = torch.autograd.grad(density, [thresholds.log_t[t.fqn] for t in targets],
                                retain_graph=True)
    assert all(float(g) < 0 for g in grads)
    # The task loss reaches every threshold through the masked kernel's mask gradient.
    x, y = data[0]
    by_name = {t.fqn: m for t, m in zip(targets, masks)}
    h = torch.relu(masked_linear(x, model.inp.weight, by_name["inp"], model.inp.bias,
                                 block_size=(8, 8)))
    live = torch.relu(masked_linear(h, model.live.weight, by_name["live"], model.live.bias,
                                    block_size=(8, 8)))
    dead = torch.relu(masked_linear(h, model.dead.weight, by_name["dead"], model.dead.bias,
                                    block_size=(8, 8)))
    loss = F.mse_loss(model.out(live + 1e-4 * dead).squeeze(-1), y)
    grads = dict(zip(by_name, torch.autograd.grad(loss, [thresholds.log_t[f] for f in by_name])))
    assert all(torch.isfinite(g) and float(g) != 0 for g in grads.values())
    # The live layer's loss is far more sensitive to its threshold than the planted one's.
    assert abs(float(grads["live"])) > 100 * abs(float(grads["dead"]))


def test_warm_start_continues_from_the_previous_thresholds() -> None:
    model, data = planted_task(steps=50)
    pruner = Pruner(model, 0.3, "learned", "block", (8, 8), filter_fn=not_head)
    first = pruner.prune(data, mse, steps=30)
    learned = pruner.thresholds.thresholds()
    # No steps: the second call only projects the thresholds it starts from; from the previous
    # ones it reproduces the previous masks exactly.
    again = pruner.prune(data, mse, steps=0)
    assert pruner.thresholds.thresholds() == pytest.approx(learned)
    assert all(torch.equal(first[f], again[f]) for f in first)
    # A fresh pruner starts at the uniform cut instead, so it does not find the planted layer.
    fresh = Pruner(model, 0.3, "learned", "block", (8, 8), filter_fn=not_head)
    fresh.prune(data, mse, steps=0)
    assert fresh.layer_densities()["dead"] > pruner.layer_densities()["dead"] + 0.1
    # A few more steps from the warm start keep the planted layer low.
    pruner.prune(data, mse, steps=5)
    assert pruner.layer_densities()["dead"] < 0.1


def test_cap_keeps_every_layer_at_the_soft_boundary() -> None:
    model, _ = planted_task(steps=0)
    targets = find_targets(model, "element", (8, 8), not_head)
    scores = [normalize_scores(magnitude_scores(t.weight, None)) for t in targets]
    thresholds = LearnedThresholds()
    thresholds.prepare(targets, scores, 0.3, tau=0.2)
    for t in targets:  # far above every score: all sigmoids saturated at 0
        thresholds.log_t[t.fqn] = torch.tensor(50.0, requires_grad=True)
    floors = [0.1 * t.num_weights for t in targets]
    thresholds.cap(targets, scores, floors)
    for m, floor in zip(thresholds.soft_masks(targets, scores, tau=0.01), floors):
        assert int((m >= 0.5).sum()) >= floor  # the floor's groups are at or above threshold
        assert int((m >= 0.5).sum()) <= floor + 1
