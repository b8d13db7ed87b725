"""Pruning quality: held-out NE of an MLP click model pruned by every method at equal budgets.

A fixed synthetic click task (a random teacher network over 64 dense features, of which only
16 carry signal, with a CTR-like base rate), an MLP ``64 -> 256 -> 256 -> 128 -> 1`` trained
dense, then for each method, density and granularity:

1. a copy of the dense model is pruned (the three hidden layers; the ``128 -> 1`` head is
   smaller than one 16x16 block and stays dense for every method);
2. it is fine-tuned with its masks fixed (``SparseLinear`` layers, masked kernel);
3. normalized entropy (NE, mean log-loss over the entropy of the base rate) is measured on a
   held-out set, with each layer's density.

Every method gets the same number of training steps after the dense model: ``gmp`` and
``learned`` spend ``--transition-steps`` of them pruning (training the pruned layers while the
masks form), the one-shot methods (``uniform``, ``global``, ``lamp``) fine-tune for those steps
instead. The dense reference is the dense model trained for those same extra steps. Each cell is
the mean over ``--seeds`` runs that differ in the order of the batches after the dense model
(the dense model and the data are fixed), so the spread between seeds shows the noise level.

    python benchmarks/bench_pruning.py            # full table (about 10 minutes on 2 cores)
    python benchmarks/bench_pruning.py --quick    # a smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adsparse.nn import SparseLinear
from adsparse.pruning import METHODS, Pruner

HIDDEN = ("fc0", "fc1", "fc2")


# --------------------------------------------------------------------------- task
@dataclass
class Task:
    """A fixed click function; training batches are fresh draws, the test set is fixed."""

    w1: torch.Tensor
    w2: torch.Tensor
    pairs: torch.Tensor
    coef: torch.Tensor
    features: int
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.features, generator=g)
        z = x[:, :self.w1.shape[0]]
        logit = (torch.tanh(z @ self.w1) @ self.w2
                 + (z[:, self.pairs[:, 0]] * z[:, self.pairs[:, 1]]) @ self.coef - 2.6)
        return x, torch.bernoulli(torch.sigmoid(logit), generator=g)


def make_task(n_test: int, seed: int = 0, features: int = 64, informative: int = 16) -> Task:
    """Clicks drawn from a random two-layer teacher over the informative features.

    The teacher mixes a smooth part (tanh units) with pairwise products, so the student needs
    its hidden layers; the logit offset puts the click rate near 15%. Training draws fresh
    examples (a stream, as online recommendation sees), so no model can overfit and a pruned
    model cannot beat the dense one by regularising it.
    """
    g = torch.Generator().manual_seed(seed)
    task = Task(torch.randn(informative, 48, generator=g) / math.sqrt(informative),
                torch.randn(48, generator=g) * 1.5 / math.sqrt(48),
                torch.randint(0, informative, (12, 2), generator=g),
                torch.randn(12, generator=g) * 0.6, features)
    task.x_test, task.y_test = task.sample(n_test, g)
    return task


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


def bce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch[0]), batch[1])


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean log-loss divided by the entropy of the window's mean label (TorchRec's NE)."""
    logloss = F.binary_cross_entropy_with_logits(logits.double(), labels.double())
    p = labels.double().mean().clamp(1e-12, 1 - 1e-12)
    base = -(p * p.log() + (1 - p) * (1 - p).log())
    return float(logloss / base)


def batches(task: Task, batch_size: int, seed: int):
    """An endless stream of fresh training batches (the same stream for a given seed)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield task.sample(batch_size, g)


def train(model: nn.Module, stream, steps: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = bce(model, next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(model: nn.Module, task: Task) -> float:
    model.eval()
    return normalized_entropy(model(task.x_test), task.y_test)


# --------------------------------------------------------------------------- one run
def dense_reference(dense: nn.Module, task: Task, args: argparse.Namespace, seed: int) -> float:
    """NE of the dense model trained for the same extra steps as every pruned model."""
    model = copy.deepcopy(dense)
    train(model, batches(task, args.batch_size, seed + 1),
          args.transition_steps + args.finetune_steps, args.lr)
    return evaluate(model, task)


def prune_and_finetune(dense: nn.Module, task: Task, method: str, density: float,
                       granularity: str, args: argparse.Namespace, seed: int) -> dict:
    model = copy.deepcopy(dense)
    torch.manual_seed(seed)
    start = time.perf_counter()
    pruner = Pruner(model, density, method, granularity, (16, 16), args.min_layer_density,
                    filter_fn=lambda m, fqn: fqn in HIDDEN, scorer=args.scorer, lr=args.lr)
    transition = args.transition_steps if method in ("gmp", "learned") else 0
    masks = pruner.prune(batches(task, args.batch_size, seed), bce, steps=transition)
    prune_s = time.perf_counter() - start
    for fqn in HIDDEN:  # fixed masks from here on, through the masked kernel
        layer = SparseLinear.from_linear(getattr(model, fqn), (16, 16), granularity,
                                         mask=masks[fqn])
        setattr(model, fqn, layer)
    finetune = args.finetune_steps + args.transition_steps - transition
    train(model, batches(task, args.batch_size, seed + 1), finetune, args.lr)
    return {"method": method, "density": density, "granularity": granularity,
            "ne": evaluate(model, task), "achieved": pruner.global_density(),
            "layers": pruner.layer_densities(), "prune_s": prune_s,
            "total_s": time.perf_counter() - start}


# --------------------------------------------------------------------------- report
def markdown(results: list[dict], dense_ne: list[float], granularity: str) -> str:
    """NE table: mean over seeds (min-max in brackets), then mean per-layer densities."""
    rows = [r for r in results if r["granularity"] == granularity]
    densities = sorted({r["density"] for r in rows}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    mean = lambda xs: sum(xs) / len(xs)
    lines = [f"Granularity {granularity}: held-out NE, mean over {len(dense_ne)} seed(s) "
             f"[min, max]; dense reference {mean(dense_ne):.4f} "
             f"[{min(dense_ne):.4f}, {max(dense_ne):.4f}]. Below the NE: densities fc0/fc1/fc2.",
             "", "| method | " + " | ".join(f"d={d:g}" for d in densities) + " |",
             "|---" * (len(densities) + 1) + "|"]
    for m in methods:
        cells = []
        for d in densities:
            runs = [r for r in rows if r["method"] == m and r["density"] == d]
            if not runs:
                cells.append("")
                continue
            ne = [r["ne"] for r in runs]
            layers = "/".join(f"{mean([r['layers'][f] for r in runs]):.2f}" for f in HIDDEN)
            cells.append(f"{mean(ne):.4f} [{min(ne):.4f}, {max(ne):.4f}]<br>{layers}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25, 0.1, 0.05])
    p.add_argument("--granularities", nargs="+", default=["block", "element"],
                   choices=["block", "element"])
    p.add_argument("--scorer", default="magnitude", choices=["magnitude", "taylor"])
    p.add_argument("--min-layer-density", type=float, default=0.02)
    p.add_argument("--test", type=int, default=50_000, help="held-out examples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dense-steps", type=int, default=3000)
    p.add_argument("--transition-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the task and dense model")
    p.add_argument("--seeds", type=int, default=2, help="runs per cell (batch orders)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the shapes are small and the machine is shared)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.densities, args.test, args.seeds = [0.25, 0.05], 10_000, 1
        args.dense_steps, args.transition_steps, args.finetune_steps = 300, 30, 30
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = make_task(args.test, seed=args.seed)
    dense = ClickMLP(task.features)
    start = time.perf_counter()
    train(dense, batches(task, args.batch_size, args.seed + 1000), args.dense_steps, args.lr)
    print(f"dense NE {evaluate(dense, task):.4f} after {args.dense_steps} steps "
          f"({time.perf_counter() - start:.1f} s); click rate {float(task.y_test.mean()):.3f}",
          flush=True)
    seeds = [args.seed + 17 + 101 * i for i in range(args.seeds)]
    dense_ne = [dense_reference(dense, task, args, s) for s in seeds]
    print("dense reference NE " + " ".join(f"{ne:.4f}" for ne in dense_ne), flush=True)
    results = []
    for granularity in args.granularities:
        for density in args.densities:
            for method in args.methods:
                for seed in seeds:
                    r = prune_and_finetune(dense, task, method, density, granularity, args, seed)
                    r["seed"] = seed
                    results.append(r)
                    print(f"{granularity:7s} d={density:<5g} {method:8s} seed {seed} "
                          f"NE {r['ne']:.4f} achieved {r['achieved']:.4f} layers "
                          + " ".join(f"{r['layers'][f]:.3f}" for f in HIDDEN)
                          + f"  ({r['total_s']:.1f} s)", flush=True)
    for granularity in args.granularities:
        print()
        print(markdown(results, dense_ne, granularity))
    out = {"dense_ne": dense_ne, "results": results, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
