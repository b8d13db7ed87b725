"""Serving benchmark: inference of the ``wide`` DLRM, dense MLPs vs 90%-sparse block MLPs.

The sparse model is the dense one passed through ``adsparse.sparsify_(density=0.1,
block_size=16x16)`` (every MLP layer keeps the 10% of its blocks of largest norm) with each
ReLU folded into the layer before it (``fuse_relu_``). Before timing, its predictions are
checked against the dense model whose weights are masked to the same blocks (max abs
difference of the click probabilities <= 1e-4). Both models then run end to end (embedding
lookups, bottom MLP, interaction, top MLP, sigmoid) on the same batch of the synthetic stream
under ``torch.inference_mode``; the table gives median times and the speedup, plus the share
of the dense model's time spent in its MLPs (the part sparsity can remove) and the speedup of
the MLPs alone (bottom + top, timed on the activations they see in the model).

Usage: ``python benchmarks/bench_serving.py [--quick] [--threads 2] [--csv PATH]``
(``main(argv)`` is the entry point, so ``adsparse bench serving`` runs this very file). The table
goes to ``benchmarks/results/serving.csv`` (from an installed wheel: ``./adsparse-results/``),
every row with the date, CPU, kernel path, threads and commit.
Target: >= 3x faster end to end at B=512 on CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from adsparse._results import default_csv, run_facts, write_csv
from adsparse.data import SyntheticCTRStream
from adsparse.models import DLRM, dlrm_preset, fuse_relu_, mlp_layers
from adsparse.nn import sparsify_

BATCHES = [1, 64, 512, 2048]
DENSITY = 0.1
BLOCK = (16, 16)
TOLERANCE = 1e-4
TARGET_BATCH, TARGET_SPEEDUP = 512, 3.0


def median_ms(fn: Callable[[], object], budget_s: float, min_reps: int = 5,
              max_reps: int = 500) -> float:
    """Median wall time of ``fn`` in ms: two warm-up calls, then repeats within ``budget_s``."""
    return paired_median_ms([fn], budget_s, min_reps, max_reps)[0]


def paired_median_ms(fns: Sequence[Callable[[], object]], budget_s: float, min_reps: int = 5,
                     max_reps: int = 500) -> list[float]:
    """Median wall time in ms of each of ``fns``, called in turn (a, b, a, b, ...).

    Interleaving makes both see the same machine: on a shared 2-core box a burst of load from
    another process then slows both sides of a ratio instead of one.
    """
    for fn in fns:
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_reps and (len(times[0]) < min_reps
                                        or time.perf_counter() - start < budget_s):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(bucket) for bucket in times]


def build_models(seed: int = 0) -> tuple[DLRM, DLRM, DLRM, SyntheticCTRStream]:
    """(dense, sparse, masked dense reference, stream) for the ``wide`` preset."""
    torch.manual_seed(seed)
    stream = SyntheticCTRStream(num_periods=1, samples_per_period=max(BATCHES), seed=seed,
                                batch_size=max(BATCHES))
    dense = dlrm_preset("wide", stream.num_dense, stream.embedding_sizes).eval()
    sparse = sparsify_(copy.deepcopy(dense), density=DENSITY, block_size=BLOCK)
    # The reference keeps nn.Linear layers but zeroes the weights outside the kept blocks.
    masked = copy.deepcopy(dense)
    for (_, linear), (_, packed) in zip(mlp_layers(masked), mlp_layers(sparse)):
        with torch.no_grad():
            linear.weight.copy_(packed.to_dense().weight)
    fuse_relu_(sparse)
    return dense, sparse.eval(), masked, stream


def mlp_ms(model: DLRM, dense_x: torch.Tensor, sparse_x: torch.Tensor, budget: float) -> float:
    """Time of the bottom and top MLPs alone, on the activations they see in the model."""
    with torch.inference_mode():
        bottom_in = dense_x
        top_in = model.interact(model.bottom_mlp(dense_x), model.embed(sparse_x))

        def run() -> None:
            model.bottom_mlp(bottom_in)
            model.top_mlp(top_in)

        return median_ms(run, budget)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 on success, 1 if predictions disagree."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter timing budget (~20 s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of repeats per timing (default 0.3 quick, 1.5 full)")
    p.add_argument("--csv", default=None,
                   help="CSV output path (default benchmarks/results/serving.csv in a checkout, "
                        "./adsparse-results/serving.csv otherwise)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.5)
    facts = {**run_facts(), "run": "quick" if args.quick else "full"}
    dense, sparse, masked, stream = build_models()
    print(f"adsparse serving: wide DLRM, MLP density {DENSITY} ({BLOCK[0]}x{BLOCK[1]} blocks), "
          f"isa={facts['isa']}, threads={facts['threads']}, torch {facts['torch']}, "
          f"{facts['device']}, {facts['cpus']} cpus, load avg {facts['load']}")
    densities = {fqn: getattr(m, "density", 1.0) for fqn, m in mlp_layers(sparse)}
    print("layer densities: " + ", ".join(f"{k}={v:.3f}" for k, v in densities.items()))
    batch = next(iter(stream.period(0)))

    header = (f"{'B':>5} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8} "
              f"{'dense MLP share':>16} {'MLP speedup':>12} {'max|dp|':>9}")
    print(header)
    rows, ok = [], True
    t_start = time.perf_counter()
    for b in BATCHES:
        dx, sx = batch.dense[:b].contiguous(), batch.sparse[:b].contiguous()
        with torch.inference_mode():
            diff = float((sparse.predict(dx, sx) - masked.predict(dx, sx)).abs().max())
            ok &= diff <= TOLERANCE
            dense_t, sparse_t = paired_median_ms(
                [lambda: dense.predict(dx, sx), lambda: sparse.predict(dx, sx)],  # noqa: B023
                2 * budget)
        dense_mlp, sparse_mlp = mlp_ms(dense, dx, sx, budget), mlp_ms(sparse, dx, sx, budget)
        row = {"batch": b, "dense_ms": dense_t, "sparse_ms": sparse_t,
               "speedup": dense_t / sparse_t, "dense_mlp_share": dense_mlp / dense_t,
               "mlp_speedup": dense_mlp / sparse_mlp, "max_abs_diff": diff}
        rows.append(row)
        print(f"{b:>5} {dense_t:>10.3f} {sparse_t:>10.3f} {row['speedup']:>7.2f}x "
              f"{row['dense_mlp_share']:>15.0%} {row['mlp_speedup']:>11.2f}x {diff:>9.1e}",
              flush=True)

    target = next(r for r in rows if r["batch"] == TARGET_BATCH)
    met = target["speedup"] >= TARGET_SPEEDUP
    print(f"\npredictions match the masked dense model (<= {TOLERANCE:g}): "
          f"{'yes' if ok else 'NO'}")
    print(f"target: >= {TARGET_SPEEDUP:g}x end to end at B={TARGET_BATCH}: "
          f"{target['speedup']:.2f}x {'MET' if met else 'MISSED'} "
          f"({time.perf_counter() - t_start:.1f} s)")
    print(f"wrote {write_csv(args.csv or default_csv(__file__, 'serving.csv'), rows, facts)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
