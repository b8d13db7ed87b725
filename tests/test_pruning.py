"""Pruner contract: budget exactness, layer floors, LAMP/GMP by hand, scorers vs float64, errors.

Budgets are checked by expanding every returned mask to ``[N, K]`` and counting real weights,
independently of the group sizes the pruner uses.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_benchmark
from torch import nn

from adsparse.nn import SparseLinear, expand_block_mask, sparsify_
from adsparse.pruning import (
    METHODS,
    Pruner,
    TaylorScorer,
    cubic_density,
    lamp_scores,
    magnitude_scores,
)
from adsparse.pruning.allocation import rank_groups, select_allocation, select_global
from adsparse.pruning.targets import TransitionSession, cycle_batches, find_targets

BLOCK = (5, 7)  # odd, and dividing none of the layer shapes below

pytestmark = pytest.mark.usefixtures("one_thread")



def odd_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(23, 37), nn.ReLU(), nn.Linear(37, 19), nn.ReLU(),
                         nn.Linear(19, 11))


def regression_data(model: nn.Module, n: int = 96, batch: int = 32):
    x = torch.randn(n, model[0].in_features)
    y = torch.randn(n, model[-1].out_features)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def kept_weights(model: nn.Module, masks: dict[str, torch.Tensor], block) -> dict[str, int]:
    """Real weights under each mask, counted on the expanded ``[N, K]`` mask."""
    out = {}
    for fqn, m in masks.items():
        w = model.get_submodule(fqn).weight
        full = m if block is None else expand_block_mask(m, block, tuple(w.shape))
        assert full.shape == w.shape
        out[fqn] = int(full.sum())
    return out


@pytest.mark.parametrize("granularity", ["block", "element"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("density", [0.13, 0.5])
def test_budget_exact_every_method(method: str, granularity: str, density: float) -> None:
    model = odd_mlp()
    block = BLOCK if granularity == "block" else None
    pruner = Pruner(model, density, method, granularity, BLOCK, min_layer_density=0.05)
    masks = pruner.prune(regression_data(model), mse, steps=6)
    assert set(masks) == {"0", "2", "4"}
    kept = kept_weights(model, masks, block)
    total = sum(model.get_submodule(f).weight.numel() for f in masks)
    group = 1 if block is None else BLOCK[0] * BLOCK[1]
    assert abs(sum(kept.values()) - density * total) <= group
    for fqn, n in kept.items():
        numel = model.get_submodule(fqn).weight.numel()
        assert n >= 0.05 * numel
        assert pruner.layer_densities()[fqn] == pytest.approx(n / numel)
        assert masks[fqn].dtype == torch.bool
    assert pruner.global_density() == pytest.approx(sum(kept.values()) / total)


def test_min_layer_density_rescues_a_small_scale_layer() -> None:
    model = odd_mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # global magnitude would drop this whole layer
    plain = Pruner(model, 0.2, "global", "element", min_layer_density=0.0).prune()
    assert int(plain["2"].sum()) == 0
    floor = Pruner(model, 0.2, "global", "element", min_layer_density=0.1)
    floor.prune()
    assert floor.layer_densities()["2"] >= 0.1
    assert floor.global_density() == pytest.approx(0.2, abs=1 / (23 * 37 + 37 * 19 + 19 * 11))


def test_uniform_keeps_the_largest_blocks_of_each_layer() -> None:
    model = odd_mlp()
    masks = Pruner(model, 0.3, "uniform", "block", BLOCK, 0.0).prune()
    for fqn, m in masks.items():
        w = model.get_submodule(fqn).weight.detach().double()
        n, k = w.shape
        rms = torch.zeros(m.shape, dtype=torch.float64)
        for r in range(m.shape[0]):
            for c in range(m.shape[1]):
                blk = w[r * BLOCK[0]:(r + 1) * BLOCK[0], c * BLOCK[1]:(c + 1) * BLOCK[1]]
                rms[r, c] = blk.pow(2).mean().sqrt()
        assert float(rms[m].min()) >= float(rms[~m].max())
        assert abs(pruner_density(m, (n, k)) - 0.3) <= BLOCK[0] * BLOCK[1] / (n * k) * 1.5


def pruner_density(mask: torch.Tensor, shape) -> float:
    return float(expand_block_mask(mask, BLOCK, shape).sum()) / (shape[0] * shape[1])


def test_magnitude_scores_match_float64_block_rms() -> None:
    w = torch.randn(13, 17)
    scores = magnitude_scores(w, (4, 6))
    ref = torch.zeros(4, 3, dtype=torch.float64)
    for r in range(4):
        for c in range(3):
            ref[r, c] = w[r * 4:(r + 1) * 4, c * 6:(c + 1) * 6].double().pow(2).mean().sqrt()
    torch.testing.assert_close(scores.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(magnitude_scores(w, None), w.abs())


def test_lamp_scores_by_hand() -> None:
    got = lamp_scores(torch.tensor([3.0, 1.0, 4.0, 2.0]))
    want = torch.tensor([9 / 25, 1 / 30, 1.0, 4 / 29], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_lamp_global_selection_by_hand() -> None:
    # Layer a: |w| = 1,2,3,4 -> LAMP 1/30, 4/29, 9/25, 1. Layer b: 0.5,10,20,30 ->
    # 0.25/1400.25, 100/1400, 400/1300, 1. Top half of 8: a's {3, 4} and b's {20, 30}, where
    # global magnitude would take a's 4 and b's 10, 20, 30.
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        model[1].weight.copy_(torch.tensor([[10.0, 20.0], [-30.0, 0.5]]))
    lamp = Pruner(model, 0.5, "lamp", "element", min_layer_density=0.0).prune()
    assert lamp["0"].tolist() == [[False, False], [True, True]]
    assert lamp["1"].tolist() == [[False, True], [True, False]]
    magnitude = Pruner(model, 0.5, "global", "element", min_layer_density=0.0).prune()
    assert magnitude["0"].tolist() == [[False, False], [False, True]]
    assert magnitude["1"].tolist() == [[True, True], [True, False]]


def test_selections_from_one_ranking_equal_fresh_ones() -> None:
    # learned ranks each layer once per round and cuts it at several sizes: the masks must be
    # those of a fresh ranking, ties (repeated keys) and restriction to eligible groups included.
    g = torch.Generator().manual_seed(0)
    keys = [torch.randint(0, 5, (6, 9), generator=g).float(), torch.rand(4, 3, generator=g)]
    sizes = [torch.full((6, 9), 4.0), torch.full((4, 3), 6.0)]
    sizes[0][-1] = 2.0  # tail groups hold fewer real weights
    eligible = [torch.rand(6, 9, generator=g) > 0.3, torch.ones(4, 3, dtype=torch.bool)]
    ranked = rank_groups(keys, sizes, eligible)
    for want in ([40.0, 30.0], [100.0, 6.0], [8.0, 60.0]):
        fresh = select_allocation(keys, sizes, want, [8.0, 6.0], eligible=eligible)
        cached = select_allocation(keys, sizes, want, [8.0, 6.0], eligible=eligible,
                                   ranked=ranked)
        assert all(torch.equal(a, b) for a, b in zip(fresh, cached))
    for budget in (50.0, 120.0):
        fresh = select_global(keys, sizes, budget, [8.0, 6.0], eligible=eligible)
        cached = select_global(keys, sizes, budget, [8.0, 6.0], eligible=eligible, ranked=ranked)
        assert all(torch.equal(a, b) for a, b in zip(fresh, cached))


def test_cubic_schedule_by_hand() -> None:
    # d(t) = 0.1 + 0.9 (1 - t/4)^3
    want = [1.0, 0.4796875, 0.2125, 0.1140625, 0.1]
    assert [cubic_density(t, 4, 0.1) for t in range(5)] == pytest.approx(want)
    with pytest.raises(ValueError):
        cubic_density(5, 4, 0.1)


def test_gmp_follows_the_schedule_and_ends_at_magnitude_masks() -> None:
    model = odd_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    pruner = Pruner(model, 0.1, "gmp", "element", min_layer_density=0.0)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the caller's optimizer, a no-op
    masks = pruner.prune(regression_data(model), mse, steps=4, optimizer=frozen)
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    for h, t in zip(pruner.history, range(1, 5)):
        assert h["density"] == pytest.approx(cubic_density(t, 4, 0.1), abs=1.5 / total)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Weights did not move, so the nested cuts end where one-shot uniform magnitude does.
    uniform = Pruner(model, 0.1, "uniform", "element", min_layer_density=0.0).prune()
    for fqn in masks:
        assert torch.equal(masks[fqn], uniform[fqn])


def test_taylor_scores_match_float64_autograd() -> None:
    model = odd_mlp()
    data = regression_data(model, n=32)
    targets = find_targets(model, "block", BLOCK, None)
    scorer = TaylorScorer(beta=0.5)
    with TransitionSession(model, targets) as session:
        scorer.calibrate(session, cycle_batches(data), mse, steps=1)
    ref = copy.deepcopy(model).double()
    x, y = data[0]
    F.mse_loss(ref(x.double()), y.double()).backward()
    for t in targets:
        w = ref.get_submodule(t.fqn).weight
        signed = w.detach() * w.grad
        want = torch.zeros(t.grid, dtype=torch.float64)
        for r in range(t.grid[0]):
            for c in range(t.grid[1]):
                want[r, c] = signed[r * 5:(r + 1) * 5, c * 7:(c + 1) * 7].sum().abs()
        torch.testing.assert_close(scorer.scores(t.fqn).double(), want, rtol=1e-4, atol=1e-7)


def test_sparse_linear_masks_written_and_sparsify_matches_reference() -> None:
    model = nn.Sequential(SparseLinear(23, 37, block_size=BLOCK), nn.ReLU(),
                          SparseLinear(37, 19, block_size=BLOCK))
    pruner = Pruner(model, 0.4, "learned", "block", BLOCK, 0.05)
    data = [(torch.randn(16, 23), torch.randn(16, 19)) for _ in range(3)]
    masks = pruner.prune(data, mse, steps=5)
    for fqn, m in masks.items():
        assert torch.equal(model.get_submodule(fqn).mask, m.float())
    x = torch.randn(9, 23)
    ref = x.double()
    for i, layer in enumerate(model):
        if isinstance(layer, SparseLinear):
            w = layer.weight.detach().double() * expand_block_mask(masks[str(i)], BLOCK,
                                                                    tuple(layer.weight.shape))
            ref = ref @ w.T + layer.bias.detach().double()
        else:
            ref = torch.relu(ref)
    sparsify_(model, masks=masks, block_size=BLOCK)
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-4, atol=1e-5)


def test_filter_fn_layers_and_rest_of_model_untouched() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(23, 37), nn.BatchNorm1d(37), nn.ReLU(),
                                      nn.Linear(37, 19))
            self.head = nn.Linear(19, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = Net().train()
    data = [(torch.randn(16, 23), torch.randn(16, 3)) for _ in range(3)]
    mse(model, data[0]).backward()  # the caller's pending gradients must survive
    model.body[0].weight.requires_grad_(False)  # a frozen non-target stays frozen
    grads = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    pruner = Pruner(model, 0.3, "learned", "element", filter_fn=lambda m, n: n == "body.3")
    masks = pruner.prune(data, mse, steps=4)
    assert set(masks) == {"body.3"}
    assert dict(model.named_modules()) == modules  # the very same module objects are back
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and p.requires_grad == flags[n]
    for k, v in model.state_dict().items():
        if k.startswith("body.3."):
            continue
        assert torch.equal(v, state[k]), k  # incl. BatchNorm running stats and head
    assert not torch.equal(model.body[3].weight, state["body.3.weight"])  # trained in transition


def test_one_shot_iterator_batches_are_cycled() -> None:
    model = odd_mlp()
    data = regression_data(model, n=64)
    pruner = Pruner(model, 0.3, "gmp", "block", BLOCK)
    pruner.prune(iter(data), mse, steps=5)  # 2 batches, 5 steps
    assert len(pruner.history) == 5


def test_state_dict_round_trip_through_torch_save() -> None:
    model = odd_mlp()
    pruner = Pruner(model, 0.3, "learned", "block", BLOCK)
    pruner.prune(regression_data(model), mse, steps=5)
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    other = Pruner(model, 0.3, "learned", "block", BLOCK)
    other.load_state_dict(torch.load(buf, weights_only=True))  # tensors and plain data only
    assert other.state == pruner.state
    assert other.layer_densities() == pytest.approx(pruner.layer_densities())
    # Warm started with no steps, learned re-applies its learned allocation, without data.
    other.prune(steps=0)
    one_block = BLOCK[0] * BLOCK[1] / min(23 * 37, 37 * 19, 19 * 11)
    assert other.layer_densities() == pytest.approx(pruner.layer_densities(), abs=one_block)
    with pytest.raises(ValueError, match="granularity"):
        Pruner(model, 0.3, "learned", "element").load_state_dict(pruner.state_dict())


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_density_outside_unit_interval_raises(density: float) -> None:
    with pytest.raises(ValueError, match="target_density"):
        Pruner(odd_mlp(), density)


def test_bad_configuration_raises() -> None:
    model = odd_mlp()
    with pytest.raises(ValueError, match="min_layer_density"):
        Pruner(model, 0.1, min_layer_density=0.2)
    with pytest.raises(ValueError, match="method"):
        Pruner(model, 0.1, method="random")
    with pytest.raises(ValueError, match="scorer"):
        Pruner(model, 0.1, scorer="hessian")
    with pytest.raises(ValueError, match="no prunable layers"):
        Pruner(nn.Sequential(nn.ReLU()), 0.1)
    with pytest.raises(ValueError, match="no prunable layers"):
        Pruner(model, 0.1, filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match=r"'4'.*smaller than one 16x16 block"):
        Pruner(model, 0.1, block_size=(16, 16))
    with pytest.raises(ValueError, match="needs batches"):
        Pruner(model, 0.1, "learned", block_size=BLOCK).prune()
    with pytest.raises(ValueError, match="granularity"):
        Pruner(nn.Sequential(SparseLinear(23, 37, granularity="element")), 0.1, "uniform",
               "block", BLOCK)


@pytest.mark.parametrize(("method", "phase"), [("learned", "learned transition"),
                                             ("gmp", "gmp transition")])
def test_non_finite_loss_raises_with_step_and_restores_weights(method: str, phase: str) -> None:
    model = odd_mlp()
    calls = []

    def exploding(m, batch):
        # Count training steps only: learned also measures losses (its profiles), without
        # gradients or with gradients to the mask (the proxy's mask then requires grad).
        calls.append(torch.is_grad_enabled() and not m[0].mask.requires_grad)
        loss = mse(m, batch)
        return loss * math.inf if sum(calls) == 4 and calls[-1] else loss

    pruner = Pruner(model, 0.3, method, "block", BLOCK)
    pruner.prune(regression_data(model), mse, steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(pruner.state)
    calls.clear()
    with pytest.raises(FloatingPointError, match=f"step 3 of the {phase}"):
        pruner.prune(regression_data(model), exploding, steps=10)
    assert pruner.state == state  # the warm-start state of the last good prune
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)


def test_bench_pruning_report_merges_a_rerun_and_checks_pairing(tmp_path) -> None:
    """A rerun of one method replaces that method's runs of a full run; files whose dense
    references differ for a seed are not paired and are refused."""
    bench = load_benchmark("bench_pruning")

    def run(seed, method, ne):
        return {"model": "mlp", "seed": seed, "granularity": "block", "density": 0.1,
                "method": method, "ne": ne, "achieved": 0.1, "prune_s": 1.0, "total_s": 2.0,
                "density/fc0": 0.1}

    def dense(seed, ne):
        return {**run(seed, "dense", ne), "granularity": "-", "density": 1.0}

    full, rerun, other = (tmp_path / f"{n}_runs.csv" for n in ("full", "rerun", "other"))
    bench.write_csv(full, [dense(0, 0.5), dense(1, 0.6), run(0, "gmp", 0.7), run(1, "gmp", 0.8),
                           run(0, "learned", 0.9), run(1, "learned", 0.9)])
    bench.write_csv(rerun, [dense(0, 0.5), dense(1, 0.6), run(0, "learned", 0.65),
                            run(1, "learned", 0.75)])
    runs, refs = bench.read_runs([str(full), str(rerun)])
    assert refs == {"mlp": [0.5, 0.6]}
    got = {(r["seed"], r["method"]): r["ne"] for r in runs}
    assert got == {(0, "gmp"): 0.7, (1, "gmp"): 0.8, (0, "learned"): 0.65, (1, "learned"): 0.75}
    row = next(r for r in bench.summarize(runs, refs) if r["method"] == "learned")
    assert row["best_other"] == "gmp" and abs(row["diff_mean"] + 0.05) < 1e-12
    assert row["rank"] == 1
    # timings compare only within a file: learned's rerun has no gmp beside it
    assert bench.timing_ratio(runs).startswith("not measured")
    runs, _ = bench.read_runs([str(full)])
    assert bench.timing_ratio(runs).startswith("1.00 (1.00 s vs 1.00 s, 2 runs")
    bench.write_csv(other, [dense(0, 0.5), dense(1, 0.61), run(1, "learned", 0.7)])
    with pytest.raises(ValueError, match="not paired"):
        bench.read_runs([str(full), str(other)])


def test_bench_pruning_continues_the_dense_optimizer() -> None:
    """Every model after the dense one continues its Adam: the moment estimates by parameter
    name (copied, so one model's steps do not leak into the next), and a phase that trains
    some parameters leaves the others where they were."""
    bench = load_benchmark("bench_pruning")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    data = [(torch.randn(4, 8), torch.rand(4).round()) for _ in range(12)]

    def loss_fn(m, batch):
        return F.binary_cross_entropy_with_logits(m(batch[0]).squeeze(-1), batch[1])

    opt = bench.train(model, iter(data[:5]), loss_fn, 5, 1e-2)
    state = bench.adam_state(model, opt)
    assert set(state) == {name for name, _ in model.named_parameters()}
    copy_ = copy.deepcopy(model)
    cont = bench.continued_adam(copy_, state, 1e-3)
    dense_params = dict(model.named_parameters())
    for name, p in copy_.named_parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(cont.state[p][key], opt.state[dense_params[name]][key]), name
    assert cont.param_groups[0]["lr"] == 1e-3
    bench.train_params(copy_, [copy_[0].weight], iter(data[5:8]), loss_fn, 3, 1e-3, cont)
    assert torch.equal(copy_[2].weight, model[2].weight)
    assert torch.equal(copy_[0].bias, model[0].bias)
    assert not torch.equal(copy_[0].weight, model[0].weight)
    assert float(state["0.weight"]["step"]) == 5  # the copy handed on did not move
    assert float(cont.state[copy_[0].weight]["step"]) == 8


def test_bench_pruning_sorts_units_with_their_optimizer_state() -> None:
    """--sort-units reorders the dense model's units (same function) and every moment estimate
    with its weight: a state equal to the parameters stays equal to them after the sort."""
    bench = load_benchmark("bench_pruning")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 1))
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": p.detach().clone(),
                        "exp_avg_sq": p.detach().clone() ** 2}
    x = torch.randn(5, 8)
    before = model(x).detach()
    unsorted = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = bench.handed_on_state(model, opt, sort_units=True)
    assert torch.allclose(model(x), before, atol=1e-6)
    assert not torch.equal(model[0].weight, unsorted["0.weight"])  # the units moved
    for name, p in model.named_parameters():
        assert torch.equal(state[name]["exp_avg"], p.detach()), name
        assert torch.equal(state[name]["exp_avg_sq"], p.detach() ** 2), name
        assert float(state[name]["step"]) == 3.0


def test_bench_pruning_quick_mode_runs() -> None:
    """The benchmark's smoke mode end to end (guards it against API drift)."""
    bench = load_benchmark("bench_pruning")
    out = bench.main(["--quick", "--models", "mlp", "--methods", "uniform", "learned",
                      "--granularities", "element", "--seeds", "1"])
    assert {(r["method"], r["density"]) for r in out["runs"] if r["method"] != "dense"} == {
        (m, d) for m in ("uniform", "learned") for d in (0.25, 0.05)}
    for r in out["runs"]:
        if r["method"] == "dense":
            continue
        total = 64 * 256 + 256 * 256 + 256 * 128  # the hidden layers' weights
        assert abs(r["achieved"] - r["density"]) <= 1 / total  # one element
        assert math.isfinite(r["ne"]) and 0 < r["ne"] < 2
    # --min-share reaches learned: at 1 every layer keeps the target density (less one
    # weight), and the floors fit the budget.
    out = bench.main(["--quick", "--models", "mlp", "--methods", "learned", "--granularities",
                      "element", "--seeds", "1", "--min-share", "1"])
    for r in out["runs"]:
        if r["method"] == "learned":
            assert all(abs(d - r["density"]) < 1e-3 for d in r["layers"].values()), r


# ----------------------------------------------------------------------------- the registry
def test_registry_is_the_one_list_of_methods(monkeypatch) -> None:
    """Pruner, the CLI's --pruner choices and docs/pruning.md all follow METHODS, and a new
    method is one runner plus one registry entry."""
    from pathlib import Path

    from adsparse.cli import _parser
    from adsparse.pruning import Method, select_uniform

    parser = _parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions
               if "--pruner" in a.option_strings)
    assert list(run.choices) == list(METHODS)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "pruning.md").read_text()
    for name in METHODS:
        assert f"| `{name}` |" in docs, name

    def keep_half(ctx):  # a new method: every layer at the same density, by reversed scores
        return select_uniform([-ctx.scores(t) for t in ctx.targets], ctx.sizes, ctx.density,
                              ctx.min_weights)

    monkeypatch.setitem(METHODS, "smallest", Method(keep_half, False, "the smallest weights"))
    model = odd_mlp()
    masks = Pruner(model, 0.5, "smallest", "element", min_layer_density=0.0).prune()
    w = model[0].weight.detach().abs()
    assert float(w[masks["0"]].max()) <= float(w[~masks["0"]].min())
