"""Quality of the online paradigms, over seeds, with paired 95% confidence intervals.

    python benchmarks/bench_quality.py            # or: adsparse bench quality
    python benchmarks/bench_quality.py --quick    # a smoke run (minutes)

For every drift setting (default: ``rewire`` — the default stream — and the ``none`` control)
and every seed (the stream's and the model's seed change together), one pass over the stream
runs the dense reference and every strategy side by side on the same batches. Per strategy it
reports the mean relative NE loss vs dense (``(NE - NE_dense) / NE_dense`` per period) with a
95% t-interval over the seeds x scored periods (as paired units) and over the per-seed means
(the conservative one: periods of one seed are not independent), the paired difference to
ad2s, regenerations, handovers, the cost of one regeneration in periods of dense training, and
the train time. The stream knows its true click probabilities: the Bayes NE of each period and
the dense model's excess over it are printed, and the premise check: prune_once's gap to dense
in the scored periods before the first regime change vs after each change.

Full tables go to benchmarks/results/quality_<drift>.csv (one row per seed, strategy and
period, with the regenerations of the period and their triggers) and quality_summary.csv.

    python benchmarks/bench_quality.py --pool a.csv b.csv    # pool runs (e.g. seeds 0-4, 5-9)

``--pool`` reads per-period CSVs of several runs (other seeds, or other strategies on the same
seeds) and prints the summary over all of them. Pairing is checked, not assumed: a row that two
files both hold (the dense reference of a seed, a strategy run twice) must be identical to the
last digit, which every seed's determinism guarantees.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from adsparse._results import default_csv, write_csv
from adsparse.data import DRIFTS
from adsparse.metrics import StreamingMetrics, mean_ci, relative_ne
from adsparse.online import Experiment, OnlineConfig, make_stream, run_experiment

RESULTS_DIR = default_csv(__file__, "quality_summary.csv").parent
STRATEGIES = ["prune_once", "d2s", "d2s:r=3", "ad2s", "ad2s:handover=immediate"]
CONTROL = ["prune_once", "d2s", "ad2s"]  # the no-drift control needs only these
CONTROL_DRIFT = "none"

def bayes_ne(stream: Any) -> list[float]:
    """NE of the true click probabilities, per period (the floor no model can beat)."""
    out = []
    for p in range(stream.num_periods):
        m = StreamingMetrics()
        for batch, logits in stream.true_logits(p):
            m.update(batch.labels, torch.sigmoid(logits))
        out.append(m.compute()["ne"])
    return out


def run_one(args: argparse.Namespace, drift: str, seed: int) -> dict[str, Any]:
    """One seed of one drift setting: the run's results plus the stream's Bayes NE."""
    torch.set_num_threads(1)
    strategies = args.control_strategies if drift == CONTROL_DRIFT else args.strategies
    cfg = OnlineConfig(seed=seed, density=args.density, strategies=strategies,
                       prune_steps=args.prune_steps, max_backoff=args.max_backoff,
                       sort_units=not args.no_sort_units)
    exp = Experiment(cfg=cfg, drift=drift, periods=args.periods,
                     samples_per_period=args.samples_per_period, batch_size=args.batch_size,
                     progress=False)
    results = run_experiment(exp)
    stream = make_stream(exp)
    results["bayes_ne"] = bayes_ne(stream)
    results["regime_boundaries"] = list(getattr(stream, "regime_boundaries", []))
    return results


def run_seeds(args: argparse.Namespace, drift: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Every seed of one setting, ``args.jobs`` at a time (fresh processes, one thread each)."""
    if args.jobs <= 1:
        return [run_one(args, drift, seed) for seed in seeds]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        return list(pool.map(run_one, [args] * len(seeds), [drift] * len(seeds), seeds))


def period_gaps(results: dict[str, Any], name: str) -> dict[int, float]:
    """``{period: relative NE loss vs dense}`` over the scored periods."""
    ref = {r["period"]: r["ne"] for r in results["strategies"]["dense"]["periods"]}
    return {r["period"]: relative_ne(r["ne"], ref[r["period"]])
            for r in results["strategies"][name]["periods"] if r["scored"]}


def loss_stats(seeds: Sequence[dict[int, float]]) -> tuple[float, float, float, float]:
    """Per-seed ``{period: value}`` maps -> mean and CI over seeds x periods, mean and CI of
    the per-seed means (the conservative one: periods of one seed are not independent)."""
    m, ci = mean_ci([v for seed in seeds for v in seed.values()])
    ms, cis = mean_ci([statistics.fmean(seed.values()) for seed in seeds])
    return m, ci, ms, cis


def paired_diffs(seeds: Sequence[dict[int, float]], refs: Sequence[dict[int, float]]
                 ) -> list[dict[int, float]]:
    """Per seed, each period's value minus the reference's (same seed, same period)."""
    return [{p: v - ref[p] for p, v in seed.items()} for seed, ref in zip(seeds, refs)]


def summarize_setting(runs: list[dict[str, Any]], names: list[str],
                      reference: str = "ad2s") -> list[dict[str, Any]]:
    """One row per strategy: mean relative NE loss with CIs, paired difference to
    ``reference``, cost."""
    rows = []
    ref = [period_gaps(res, reference) for res in runs]
    for name in names:
        gaps = [period_gaps(res, name) for res in runs]
        strat = [res["strategies"][name] for res in runs]
        regen = [sum(1 for g in s["regenerations"] if g["reason"] != "warmup") for s in strat]
        won = [sum(1 for h in s.get("handovers", []) if h["outcome"] == "won") for s in strat]
        costs = [s["regeneration_cost_periods"] for s in strat
                 if s.get("regeneration_cost_periods") is not None]
        m, ci, ms, cis = loss_stats(gaps)
        d, dci, _, _ = loss_stats(paired_diffs(gaps, ref))
        rows.append({"strategy": name, "rel_ne_loss": m, "ci_units": ci, "ci_seeds": cis,
                     "mean_of_seeds": ms, "reference": reference, "minus_reference": d,
                     "minus_reference_ci": dci,
                     "regenerations": statistics.fmean(regen), "handovers": statistics.fmean(won),
                     "regen_cost_periods": statistics.fmean(costs) if costs else math.nan,
                     "train_time_s": statistics.fmean(s["train_time_s"] for s in strat)})
    return rows


def premise(runs: list[dict[str, Any]]) -> list[str]:
    """prune_once's gap before the first regime change vs in each later regime (mean, CI)."""
    lines = []
    bounds = runs[0]["regime_boundaries"]
    edges = [0, *bounds, runs[0]["num_periods"]]
    for j in range(len(edges) - 1):
        vals = [g for res in runs for p, g in period_gaps(res, "prune_once").items()
                if edges[j] <= p < edges[j + 1]]
        m, ci = mean_ci(vals)
        label = "after pruning (regime 0)" if j == 0 else f"after change {j} (p{edges[j]})"
        lines.append(f"  prune_once gap {label}: {100 * m:+.2f}% +- {100 * ci:.2f}")
    return lines


def bayes_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Bayes NE per period and the dense model's excess over it (mean over seeds)."""
    periods = runs[0]["num_periods"]
    bayes = [statistics.fmean(res["bayes_ne"][p] for res in runs) for p in range(periods)]
    dense = [statistics.fmean(res["strategies"]["dense"]["periods"][p]["ne"] for res in runs)
             for p in range(periods)]
    excess = [100 * (d - b) / b for d, b in zip(dense, bayes)]
    return ["  period      " + " ".join(f"{p:>6}" for p in range(periods)),
            "  Bayes NE    " + " ".join(f"{b:6.4f}" for b in bayes),
            "  dense NE    " + " ".join(f"{d:6.4f}" for d in dense),
            "  excess %    " + " ".join(f"{e:6.1f}" for e in excess)]


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"  {'strategy':<26}{'rel NE loss':>12}{'CI(s x p)':>10}{'CI(seeds)':>10}"
            f"{'minus ref':>12}{'CI':>8}{'regen':>7}{'won':>6}{'cost':>7}{'train s':>9}")
    out = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        out.append(f"  {r['strategy']:<26}{100 * r['rel_ne_loss']:>+11.2f}%"
                   f"{100 * r['ci_units']:>9.2f}%{100 * r['ci_seeds']:>9.2f}%"
                   f"{100 * r['minus_reference']:>+11.2f}%{100 * r['minus_reference_ci']:>7.2f}%"
                   f"{r['regenerations']:>7.1f}{r['handovers']:>6.1f}"
                   f"{r['regen_cost_periods']:>7.2f}{r['train_time_s']:>9.0f}")
    return out


def write_csvs(drift: str, runs: list[dict[str, Any]], rows: list[dict[str, Any]],
               seeds: list[int], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"quality_{drift}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "strategy", "period", "scored", "ne", "rel_ne_loss", "bayes_ne",
                    "serving_density", "regenerations", "reasons"])
        for seed, res in zip(seeds, runs):
            ref = {r["period"]: r["ne"] for r in res["strategies"]["dense"]["periods"]}
            for name, s in res["strategies"].items():
                regen = [g for g in s["regenerations"] if g["reason"] != "warmup"]
                for r in s["periods"]:
                    why = [g["reason"] for g in regen if g["period"] == r["period"]]
                    w.writerow([seed, name, r["period"], r["scored"], f"{r['ne']:.6f}",
                                f"{relative_ne(r['ne'], ref[r['period']]):.6f}",
                                f"{res['bayes_ne'][r['period']]:.6f}",
                                f"{r['serving_density']:.4f}", len(why), ";".join(why)])
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "drift": drift, "seeds": len(seeds)}
    append_rows(out_dir / "quality_summary.csv", [{**stamp, **r} for r in rows])


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path``, old rows kept; columns a file of an older version
    lacks are added (``write_csv`` takes every key of any row)."""
    old: list[dict[str, Any]] = []
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    write_csv(path, old + rows)


def read_pooled(paths: Sequence[Path]) -> dict[tuple[int, str, int], dict[str, str]]:
    """Per-period rows of several runs by (seed, strategy, period); a row two files both hold
    must agree (else the runs are not paired and ``ValueError`` says where)."""
    rows: dict[tuple[int, str, int], dict[str, str]] = {}
    for path in paths:
        with Path(path).open(newline="") as f:
            for r in csv.DictReader(f):
                key = (int(r["seed"]), r["strategy"], int(r["period"]))
                old = rows.get(key)
                if old is not None and (old["ne"], old["scored"]) != (r["ne"], r["scored"]):
                    raise ValueError(f"{path}: seed {key[0]} {key[1]} period {key[2]} has NE "
                                     f"{r['ne']}, another file {old['ne']}: not the same run")
                rows[key] = r
    return rows


def pool_table(rows: dict[tuple[int, str, int], dict[str, str]], reference: str) -> list[str]:
    """The pooled summary: per strategy over the seeds it ran, its relative NE loss and its
    paired difference to ``reference`` (positive: the reference is better), each with the
    95% CI over seeds x scored periods and over per-seed means, and the seeds it lost."""
    gaps: dict[str, dict[int, dict[int, float]]] = {}
    regen: dict[str, dict[int, int]] = {}
    for (seed, name, period), r in rows.items():
        if r["scored"] == "True":
            gaps.setdefault(name, {}).setdefault(seed, {})[period] = float(r["rel_ne_loss"])
        if r.get("regenerations", "") != "":
            regen.setdefault(name, {}).setdefault(seed, 0)
            regen[name][seed] += int(r["regenerations"])
    if reference not in gaps:
        raise ValueError(f"no rows of the reference strategy {reference!r}")
    ref = gaps[reference]
    head = (f"  {'strategy':<34}{'seeds':>6}{'rel NE loss':>12}{'CI(s x p)':>10}"
            f"{'CI(seeds)':>10}{'minus ref':>11}{'CI(s x p)':>10}{'CI(seeds)':>10}"
            f"{'ref worse':>10}{'regen':>7}")
    out = [f"  reference: {reference}", head, "  " + "-" * (len(head) - 2)]
    for name in sorted(gaps, key=lambda n: (n != "dense", n)):
        per_seed = gaps[name]
        seeds = sorted(per_seed)
        m, ci, _, cis = loss_stats([per_seed[sd] for sd in seeds])
        both = [sd for sd in seeds if sd in ref]
        diffs = paired_diffs([per_seed[sd] for sd in both], [ref[sd] for sd in both])
        d, dci, _, dcis = loss_stats(diffs)
        lost = sum(1 for diff in diffs if statistics.fmean(diff.values()) < 0)
        counts = regen.get(name, {})
        r = (f"{statistics.fmean(counts[sd] for sd in seeds):7.1f}"
             if all(sd in counts for sd in seeds) else f"{'?':>7}")
        out.append(f"  {name:<34}{len(seeds):>6}{100 * m:>+11.2f}%{100 * ci:>9.2f}%"
                   f"{100 * cis:>9.2f}%{100 * d:>+10.2f}%{100 * dci:>9.2f}%{100 * dcis:>9.2f}%"
                   f"{f'{lost}/{len(both)}':>10}{r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    exp0, cfg0 = Experiment(), OnlineConfig()
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed (default 0): --seed 5 --seeds 5 runs seeds 5-9, which "
                             "a run of seeds 0-4 can be pooled with (every seed is reproducible)")
    drifts = f"{exp0.drift},{CONTROL_DRIFT}"
    parser.add_argument("--drifts", default=drifts,
                        help=f"drift settings, comma-separated, of {', '.join(DRIFTS)} "
                             f"(default {drifts}; {CONTROL_DRIFT} runs the control strategies)")
    parser.add_argument("--density", type=float, default=cfg0.density,
                        help=f"density of every sparse strategy (default {cfg0.density})")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"strategies besides dense (default {','.join(STRATEGIES)})")
    parser.add_argument("--control-strategies", default=",".join(CONTROL),
                        help="strategies of the settings without regime changes (default "
                             f"{','.join(CONTROL)})")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run in parallel processes, one thread each (default 1)")
    parser.add_argument("--periods", type=int, default=exp0.periods,
                        help=f"periods per run (default {exp0.periods})")
    parser.add_argument("--samples-per-period", type=int, default=exp0.samples_per_period,
                        help=f"samples per period (default {exp0.samples_per_period})")
    parser.add_argument("--batch-size", type=int, default=exp0.batch_size,
                        help=f"mini-batch size (default {exp0.batch_size})")
    parser.add_argument("--prune-steps", type=int, default=cfg0.prune_steps,
                        help=f"steps of one pruning transition (default {cfg0.prune_steps})")
    parser.add_argument("--max-backoff", type=int, default=cfg0.max_backoff,
                        help="ad2s back-off after dropped challengers, 0 = none "
                             f"(default {cfg0.max_backoff})")
    parser.add_argument("--no-sort-units", action="store_true",
                        help="choose block masks without sorting units first (the "
                             "comparison of docs/pruning.md)")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 4 short periods: a smoke run, not a result")
    parser.add_argument("--pool", type=Path, nargs="+", metavar="CSV",
                        help="print the summary of these per-period CSVs (quality_<drift>.csv "
                             "of runs on other seeds or strategies) instead of running")
    parser.add_argument("--reference", default="ad2s",
                        help="the strategy the others are compared with paired (default ad2s; "
                             "a run must include it)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="folder of the CSV files (default benchmarks/results in a "
                             "checkout, ./adsparse-results from an installed wheel)")
    args = parser.parse_args(argv)
    if args.pool:
        try:
            lines = pool_table(read_pooled(args.pool), args.reference)
        except (OSError, KeyError, ValueError) as e:
            parser.error(f"--pool: {e}")
        print(f"# bench_quality --pool {' '.join(str(p) for p in args.pool)}")
        print("rel NE loss vs dense and paired difference to the reference (positive: the "
              "reference is better), 95% CI half-widths over seeds x scored periods and over "
              "per-seed means; 'ref worse' = seeds where the strategy beat the reference; "
              "regen = regenerations after warm-up per seed ('?' where a CSV predates the "
              "column)")
        print("\n".join(lines))
        return 0
    if args.quick:
        args.seeds, args.periods, args.samples_per_period = 2, 4, 4096
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.control_strategies = [s for s in args.control_strategies.split(",") if s]
    drifts = [d for d in args.drifts.split(",") if d]
    for drift in drifts:
        names = args.control_strategies if drift == CONTROL_DRIFT else args.strategies
        if args.reference not in names or "prune_once" not in names:
            parser.error(f"the strategies of drift {drift} must include {args.reference} "
                         "(--reference) and prune_once (the comparisons need them)")
    torch.set_num_threads(1)
    if args.seeds < 1 or args.seed < 0:
        parser.error(f"--seeds must be >= 1 and --seed >= 0, got {args.seeds} and {args.seed}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"# bench_quality {time.strftime('%Y-%m-%d %H:%M')}: {args.periods} periods x "
          f"{args.samples_per_period} samples (batch {args.batch_size}), density "
          f"{args.density}, seeds {seeds}, 1 thread per run, units "
          f"{'unsorted' if args.no_sort_units else 'sorted'} before block masks", flush=True)
    for drift in drifts:
        start = time.perf_counter()
        runs = run_seeds(args, drift, seeds)
        names = args.control_strategies if drift == CONTROL_DRIFT else args.strategies
        rows = summarize_setting(runs, ["dense", *names], args.reference)
        print(f"\n## drift={drift} ({time.perf_counter() - start:.0f} s, {args.jobs} jobs)")
        print("rel NE loss = mean over seeds x scored periods of (NE - NE_dense)/NE_dense; CIs "
              "are 95% half-widths; 'minus ref' = paired difference to the reference "
              f"{args.reference} (positive: the reference is better); "
              "regen = regenerations after warm-up, won = challenger handovers, cost = one "
              "regeneration in periods of dense training (mean)")
        print("\n".join(table(rows)))
        print("\n".join(bayes_lines(runs)))
        if runs[0]["regime_boundaries"]:
            print("\n".join(premise(runs)))
        write_csvs(drift, runs, rows, seeds, args.out)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
