"""Pruning quality: held-out NE of two click models pruned by every method at equal budgets.

Models (``--models``):

* ``mlp``: an MLP ``64 -> 256 -> 256 -> 128 -> 1`` on a fixed synthetic click function (a random
  teacher network over 32 of the 64 dense features, tanh units plus pairwise products) that
  needs the MLP's capacity: the dense model is still improving when it is pruned, and cutting it
  to 10% or 5% of its weights costs NE. fc0/fc1/fc2 are pruned; the 128 -> 1 head is smaller than
  one 16x16 block and stays dense.
* ``dlrm``: the ``kaggle`` DLRM preset (bottom 13-512-256-64-16, top 367-512-256-1) on the
  default synthetic stream (``SyntheticCTRStream`` with its defaults, tables capped at 2000 rows
  as ``adsparse run`` does). The layers that hold a 16x16 block are pruned (bottom 2/4/6, top
  0/2); the 13-wide input layer and the 1-wide head stay dense, as in the online runs.

For every seed (``--seeds``): a task (MLP: teacher and test set; DLRM: the stream's seed) and a
dense model trained on it; then, from that same dense model and on the same batches (paired),
for each granularity, density and method:

1. phase 1, ``--transition-steps`` steps that train the pruned layers only: ``gmp`` and
   ``learned`` run their transition; a one-shot method (``uniform``, ``global``, ``lamp``)
   prunes at once, then trains those layers through its fixed masks;
2. phase 2, ``--finetune-steps`` steps that train every parameter with the masks fixed
   (``SparseLinear``, masked kernel);
3. normalized entropy (NE: mean log-loss over the entropy of the base rate) is measured on
   held-out data.

Both phases continue the dense training's Adam (its moment estimates) at ``--after-lr``
(``REGIMES``): a fresh Adam's first steps move every weight by about the lr whatever its
gradient, which cost the DLRM's dense reference more NE than pruning half its weights did (a
pruned weight no longer moves), so pruned models beat the reference for the optimizer's sake.
The MLP's task is stationary: its dense training is cosine-annealed from ``--lr`` to that lr
(1e-4), so the dense reference is the best model and a pruned one pays for what it lost. The
DLRM is tested on the period after its dense training (period 3 of the stream, the same regime
as periods 0-2, with the stream's gradual drift: new IDs and shifted popularity, which every
model learns in the 100 steps): its dense training ends at ``--lr`` and the phases run at
3e-4. The dense reference gets exactly the same two phases on the same batches (phase 1 trains
the layers the others prune) with the same optimizer, so every model has trained the same
parameters for the same steps. Cells report the mean NE over seeds with a 95% confidence
interval (Student t), each method's mean per-layer densities, and,
for ``learned``, the paired difference to the best other method with its 95% CI (negative:
``learned`` better; significant when the CI excludes 0). Transition wall times are recorded
(``learned`` / ``gmp`` ratio in the summary).

    python benchmarks/bench_pruning.py            # full run, CSVs in benchmarks/results/
    python benchmarks/bench_pruning.py --quick    # a smoke run (2-3 minutes)

Each model in its own run (one after the other on a shared machine), then one report:

    python benchmarks/bench_pruning.py --models mlp --out benchmarks/results/pruning_mlp
    python benchmarks/bench_pruning.py --models dlrm --out benchmarks/results/pruning_dlrm
    python benchmarks/bench_pruning.py --report benchmarks/results/pruning_{mlp,dlrm}_runs.csv
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adsparse import metrics
from adsparse._results import write_csv

# The report is its own module beside this script, reached through the package the folder is
# installed as (adsparse.benchmarks: a checkout set up by `make setup` and a wheel alike), so it
# resolves however this script is loaded (run, `adsparse bench`, or by path in the tests).
from adsparse.benchmarks.pruning_report import (  # noqa: F401  (re-exported for the tests)
    markdown,
    print_report,
    read_runs,
    report,
    summarize,
    targets,
    timing_ratio,
)
from adsparse.nn import SparseLinear
from adsparse.pruning import METHODS, LearnedConfig, Pruner, permute_like, sort_units_

RESULTS = Path(__file__).resolve().parent / "results"


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """NE of a model's logits (``adsparse.metrics.ne``; sigmoid in float64 so that confident
    logits keep their precision)."""
    return metrics.ne(labels, torch.sigmoid(logits.double()))


# --------------------------------------------------------------------------- the MLP task
@dataclass
class Teacher:
    """A fixed click function over the first ``informative`` of ``features`` Gaussian inputs."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    pairs: torch.Tensor
    coef: torch.Tensor
    offset: float
    features: int

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.features, generator=g)
        z = x[:, :self.w1.shape[0]]
        h = torch.tanh(torch.tanh(z @ self.w1) @ self.w2)
        logit = (h @ self.w3 + (z[:, self.pairs[:, 0]] * z[:, self.pairs[:, 1]]) @ self.coef
                 + self.offset)
        return x, torch.bernoulli(torch.sigmoid(logit), generator=g)


def make_teacher(seed: int, features: int = 64, informative: int = 32, hidden: int = 96
                 ) -> Teacher:
    """A two-layer tanh teacher plus 24 pairwise products, click rate near 20%.

    Wide enough that the student MLP uses its capacity (NE keeps falling with training and a
    5%-dense student cannot match the dense one); half of the inputs are pure noise, so that
    the first layer and the others deserve different densities.
    """
    g = torch.Generator().manual_seed(seed)
    return Teacher(torch.randn(informative, hidden, generator=g) * 1.5 / math.sqrt(informative),
                   torch.randn(hidden, hidden, generator=g) * 1.5 / math.sqrt(hidden),
                   torch.randn(hidden, generator=g) * 2.5 / math.sqrt(hidden),
                   torch.randint(0, informative, (24, 2), generator=g),
                   torch.randn(24, generator=g) * 0.5, -1.6, features)


class ClickMLP(nn.Module):
    def __init__(self, features: int = 64) -> None:
        super().__init__()
        self.fc0 = nn.Linear(features, 256)
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 128)
        self.head = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc0(x))
        h = torch.relu(self.fc1(h))
        h = torch.relu(self.fc2(h))
        return self.head(h).squeeze(-1)


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch[0]), batch[1])


# --------------------------------------------------------------------------- one model's setup
@dataclass
class Setup:
    """One seed of one model: the dense model, its loss, the batches after it, the test set."""

    name: str
    dense: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    after: Callable[[], Iterator[Any]]  # the same batches for every method of this seed
    evaluate: Callable[[nn.Module], float]
    layers: list[str]  # the pruned layers, in order
    dense_s: float
    adam_state: dict[str, dict]  # the dense training's optimizer state, by parameter name


def mlp_setup(seed: int, args: argparse.Namespace) -> Setup:
    teacher = make_teacher(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_test, y_test = teacher.sample(args.test, g)
    torch.manual_seed(seed)
    dense = ClickMLP(teacher.features)

    def stream(s: int) -> Iterator[Any]:
        gen = torch.Generator().manual_seed(s)
        while True:
            yield teacher.sample(args.batch_size, gen)

    start = time.perf_counter()
    opt = train(dense, stream(seed + 1000), mlp_loss, args.mlp_dense_steps, args.lr,
                args.after_lr if REGIMES["mlp"].anneal else None)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        out = normalized_entropy(model(x_test), y_test)
        model.train()
        return out

    return Setup("mlp", dense, mlp_loss, lambda: stream(seed + 2000), evaluate,
                 ["fc0", "fc1", "fc2"], time.perf_counter() - start,
                 handed_on_state(dense, opt, args.sort_units))


def dlrm_setup(seed: int, args: argparse.Namespace) -> Setup:
    from adsparse.data import CRITEO_LIKE_SIZES, SyntheticCTRStream
    from adsparse.models.dlrm import dlrm_preset, mlp_layers

    sizes = [min(n, 2000) for n in CRITEO_LIKE_SIZES]  # what `adsparse run` uses by default
    stream = SyntheticCTRStream(seed=seed, batch_size=args.batch_size, embedding_sizes=sizes,
                                samples_per_period=args.dlrm_period_samples)
    torch.manual_seed(seed)
    dense = dlrm_preset("kaggle", stream.num_dense, sizes)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels)

    start = time.perf_counter()
    periods = args.dlrm_dense_periods
    dense_batches = [b for p in range(periods) for b in stream.period(p)]
    opt = train(dense, iter(dense_batches), loss_fn, len(dense_batches), args.lr,
                args.after_lr if REGIMES["dlrm"].anneal else None)
    held = list(stream.period(periods))  # the next period: its head trains, its tail tests
    n_test = max(1, len(held) // 4)
    train_part, test_part = held[:-n_test], held[-n_test:]

    def after() -> Iterator[Any]:
        while True:
            yield from train_part

    dense_ = torch.cat([b.dense for b in test_part])
    sparse_ = torch.cat([b.sparse for b in test_part])
    labels_ = torch.cat([b.labels for b in test_part])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        out = normalized_entropy(model(dense_, sparse_), labels_)
        model.train()
        return out

    layers = [fqn for fqn, m in mlp_layers(dense) if m.in_features >= 16 and m.out_features >= 16]
    return Setup("dlrm", dense, loss_fn, after, evaluate, layers, time.perf_counter() - start,
                 handed_on_state(dense, opt, args.sort_units))


class Regime(NamedTuple):
    """What follows a model's dense training: phase 1 and 2 steps (sized for the run time), the
    Adam lr of both phases and of the dense reference, and whether the dense training anneals
    to that lr (cosine from ``--lr``)."""

    transition: int
    finetune: int
    after_lr: float
    anneal: bool


SETUPS = {"mlp": mlp_setup, "dlrm": dlrm_setup}
# MLP: a stationary task, so the dense training anneals to the lr of everything after it. DLRM:
# the tested period brings new IDs that every model must learn in 100 steps; its dense training
# ends at --lr and the rest runs at 3e-4 (with a fresh Adam, at an annealed 1e-4 no pruned
# model adapted: block 10% NE 1.8-2.0).
REGIMES = {"mlp": Regime(80, 80, 1e-4, True), "dlrm": Regime(50, 50, 3e-4, False)}


# --------------------------------------------------------------------------- training and runs
def train(model: nn.Module, stream: Iterator[Any], loss_fn: Callable, steps: int, lr: float,
          final_lr: float | None = None, optimizer: torch.optim.Optimizer | None = None
          ) -> torch.optim.Optimizer:
    """``steps`` Adam steps at ``lr``, or cosine-annealed from ``lr`` to ``final_lr``; a fresh
    Adam over the trainable parameters unless ``optimizer`` is given. Returns the optimizer."""
    opt = optimizer or torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                        lr=lr)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    for step in range(steps):
        if final_lr is not None:
            for group in opt.param_groups:
                group["lr"] = final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * step
                                                                              / steps))
        loss = loss_fn(model, next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return opt


def adam_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    """The optimizer's per-parameter state by parameter name (copied): what the dense
    training hands on to everything after it."""
    return {name: {k: v.detach().clone() if torch.is_tensor(v) else v
                   for k, v in opt.state[p].items()}
            for name, p in model.named_parameters() if p in opt.state}


def handed_on_state(dense: nn.Module, opt: torch.optim.Optimizer, sort_units: bool
                    ) -> dict[str, dict]:
    """The dense training's Adam state for everything after it; with ``sort_units`` the dense
    model's units are first sorted by magnitude (``adsparse.pruning.sort_units_``, what the
    online trainer does before block masks; the function is unchanged) and the moment
    estimates reordered with them."""
    state = adam_state(dense, opt)
    if sort_units:
        orders = sort_units_(dense)
        state = {name: {k: permute_like(name, v, orders) if k != "step" else v
                        for k, v in s.items()} for name, s in state.items()}
    return state


def continued_adam(model: nn.Module, state: dict[str, dict], lr: float) -> torch.optim.Adam:
    """An Adam over all of ``model``'s parameters that continues the dense training's moment
    estimates (``state`` from :func:`adam_state`; a copy of the dense model has the same
    parameter names, and ``SparseLinear.from_linear`` keeps the layer's Parameters).

    A fresh Adam's first steps move every weight by about ``lr`` whatever its gradient: on
    the DLRM that cost the dense reference 0.018 NE in 100 steps, more than pruning half its
    weights did (those weights no longer move), so pruned models beat the reference. Parameters
    frozen in a phase get no gradient and Adam skips them.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for name, p in model.named_parameters():
        if name in state:
            opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v
                            for k, v in state[name].items()}
    return opt


def pruned_params(model: nn.Module, layers: list[str]) -> list[nn.Parameter]:
    """Weights and biases of the pruned layers: what a transition trains."""
    out = []
    for fqn in layers:
        layer = model.get_submodule(fqn)
        out += [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return out


def train_params(model: nn.Module, params: list[nn.Parameter], stream: Iterator[Any],
                 loss_fn: Callable, steps: int, lr: float, optimizer: torch.optim.Optimizer
                 ) -> None:
    """``steps`` steps of ``optimizer`` over ``params`` only (the rest stays as it is)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    try:
        train(model, stream, loss_fn, steps, lr, optimizer=optimizer)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def dense_reference(setup: Setup, args: argparse.Namespace) -> float:
    """The dense model with the same training after it as every pruned model: phase 1 trains
    the would-be pruned layers only, phase 2 everything, with the dense training's Adam."""
    model = copy.deepcopy(setup.dense)
    stream = setup.after()
    opt = continued_adam(model, setup.adam_state, args.after_lr)
    train_params(model, pruned_params(model, setup.layers), stream, setup.loss_fn,
                 args.transition_steps, args.after_lr, opt)
    train(model, stream, setup.loss_fn, args.finetune_steps, args.after_lr, optimizer=opt)
    return setup.evaluate(model)


def prune_and_finetune(setup: Setup, method: str, density: float, granularity: str,
                       args: argparse.Namespace) -> dict:
    """Phase 1 (``transition_steps``): ``gmp``/``learned`` run their transition, which trains
    the pruned layers only; a one-shot method prunes, then trains the same layers through its
    fixed masks. Phase 2 (``finetune_steps``): every parameter, masks fixed. Both phases
    continue the dense training's Adam at ``after_lr``, so all methods (and the dense
    reference) train the same parameters for the same steps with the same optimizer."""
    model = copy.deepcopy(setup.dense)
    stream = setup.after()
    opt = continued_adam(model, setup.adam_state, args.after_lr)
    trains = METHODS[method].trains
    start = time.perf_counter()
    pruner = Pruner(model, density, method, granularity, (16, 16), args.min_layer_density,
                    filter_fn=lambda m, fqn: fqn in setup.layers, scorer=args.scorer,
                    lr=args.after_lr, gmp_update_every=args.update_every,
                    learned=LearnedConfig(update_every=args.update_every,
                                          min_share=args.min_share))
    masks = pruner.prune(stream, setup.loss_fn, steps=args.transition_steps if trains else 0,
                         optimizer=opt)
    prune_s = time.perf_counter() - start
    for fqn in setup.layers:  # fixed masks from here on, through the masked kernel
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = SparseLinear.from_linear(getattr(parent, child), (16, 16), granularity,
                                         mask=masks[fqn])
        setattr(parent, child, layer)
    if not trains:
        train_params(model, pruned_params(model, setup.layers), stream, setup.loss_fn,
                     args.transition_steps, args.after_lr, opt)
    train(model, stream, setup.loss_fn, args.finetune_steps, args.after_lr, optimizer=opt)
    return {"ne": setup.evaluate(model), "achieved": pruner.global_density(),
            "layers": pruner.layer_densities(), "prune_s": prune_s,
            "total_s": time.perf_counter() - start}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25, 0.1, 0.05])
    p.add_argument("--granularities", nargs="+", default=["block", "element"],
                   choices=["block", "element"])
    p.add_argument("--scorer", default="magnitude", choices=["magnitude", "taylor"])
    p.add_argument("--min-layer-density", type=float, default=0.02)
    p.add_argument("--seeds", type=int, default=5, help="independent tasks and dense models")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--test", type=int, default=30_000, help="MLP: held-out examples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--mlp-dense-steps", type=int, default=2500)
    p.add_argument("--dlrm-dense-periods", type=int, default=3)
    p.add_argument("--dlrm-period-samples", type=int, default=65536)
    p.add_argument("--transition-steps", type=int, default=None,
                   help="phase 1 steps (default: mlp 80, dlrm 50)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="phase 2 steps (default: mlp 80, dlrm 50)")
    p.add_argument("--update-every", type=int, default=4,
                   help="steps between mask updates of gmp and learned (both)")
    p.add_argument("--min-share", type=float, default=LearnedConfig.min_share,
                   help="learned: every layer keeps at least this share of the target density "
                        f"(default {LearnedConfig.min_share})")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam lr of the dense training (mlp: at its start, cosine-annealed to "
                        "the after-lr)")
    p.add_argument("--after-lr", type=float, default=None,
                   help="Adam lr of everything after the dense training (transitions, "
                        "fine-tune, dense reference; default: mlp 1e-4, where its dense "
                        "training anneals to, dlrm 3e-4)")
    p.add_argument("--sort-units", action="store_true",
                   help="sort the dense model's units by magnitude before pruning (as the online "
                        "trainer does before block masks; docs/pruning.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the shapes are small and the machine is shared)")
    p.add_argument("--report", nargs="+", metavar="RUNS_CSV",
                   help="no runs: print the tables and targets of these *_runs.csv files "
                        "(e.g. of --models mlp and --models dlrm run side by side) and write "
                        "their combined summary to OUT_summary.csv")
    p.add_argument("--out", default=str(RESULTS / "pruning"),
                   help="CSV prefix (PREFIX_runs.csv, PREFIX_summary.csv); '' for none")
    args = p.parse_args(argv)
    if args.quick:
        args.densities, args.test, args.seeds = [0.25, 0.05], 5000, 2
        args.mlp_dense_steps = 200
        args.transition_steps = args.transition_steps or 30
        args.finetune_steps = args.finetune_steps or 20
        args.dlrm_dense_periods, args.dlrm_period_samples = 1, 8192
        if args.out == str(RESULTS / "pruning"):
            args.out = ""
    args.transition, args.finetune = args.transition_steps, args.finetune_steps
    args.after = args.after_lr
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        missing = [p for p in args.report if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"bench_pruning: --report: no such file: {', '.join(missing)}")
        return {"summary": report(args.report, args.out)}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"bench_pruning: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s); "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    runs: list[dict] = []
    dense: dict[str, list[float]] = {}
    for model in args.models:
        for i in range(args.seeds):
            seed = args.seed + i
            regime = REGIMES[model]
            args.after_lr = args.after or regime.after_lr
            args.transition_steps = args.transition or regime.transition
            args.finetune_steps = args.finetune or regime.finetune
            setup = SETUPS[model](seed, args)
            ref = dense_reference(setup, args)
            dense.setdefault(model, []).append(ref)
            print(f"{model} seed {seed}: dense trained in {setup.dense_s:.0f} s, NE "
                  f"{setup.evaluate(setup.dense):.4f}, reference (after the same "
                  f"{args.transition_steps + args.finetune_steps} steps) {ref:.4f}", flush=True)
            runs.append({"model": model, "seed": seed, "granularity": "-", "density": 1.0,
                         "method": "dense", "ne": ref, "achieved": 1.0, "prune_s": 0.0,
                         "total_s": 0.0, "layers": {f: 1.0 for f in setup.layers}})
            for gran in args.granularities:
                for density in args.densities:
                    for method in args.methods:
                        r = prune_and_finetune(setup, method, density, gran, args)
                        r.update({"model": model, "seed": seed, "granularity": gran,
                                  "density": density, "method": method})
                        runs.append(r)
                        print(f"  {gran:7s} d={density:<5g} {method:8s} NE {r['ne']:.4f} "
                              f"(dense {ref:.4f}) layers "
                              + " ".join(f"{r['layers'][f]:.3f}" for f in setup.layers)
                              + f"  prune {r['prune_s']:.1f} s, total {r['total_s']:.1f} s",
                              flush=True)
    pruned = [r for r in runs if r["method"] != "dense"]
    rows = print_report(pruned, dense, args.models, args.granularities)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        flat = []
        for r in runs:
            row = {k: v for k, v in r.items() if k != "layers"}
            row.update({f"density/{k}": v for k, v in r["layers"].items()})
            flat.append(row)
        write_csv(Path(args.out + "_runs.csv"), flat)
        write_csv(Path(args.out + "_summary.csv"), rows)
    return {"runs": runs, "summary": rows, "dense_ne": dense, "args": vars(args)}


if __name__ == "__main__":
    main(sys.argv[1:])
