"""The report of ``bench_pruning.py``: its runs (``*_runs.csv``, merged across files and reruns)
summarized per cell — mean NE and 95% CI per method, mean per-layer densities, ``learned``'s
paired difference to the best other method, the issue's targets and the ``learned`` / ``gmp``
transition time — as the markdown tables of benchmarks/RESULTS.md and docs/pruning.md.

Imported by ``bench_pruning.py`` (``--report`` and the end of every run); not a benchmark.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from adsparse._results import write_csv
from adsparse.metrics import mean_ci
from adsparse.pruning import METHODS

__all__ = ["PAIRED_RTOL", "markdown", "print_report", "read_runs", "report", "summarize",
           "targets", "timing_ratio"]

PAIRED_RTOL = 1e-7  # dense references of two files this close are the same model


def summarize(runs: list[dict], dense: dict[str, list[float]]) -> list[dict]:
    """One row per (model, granularity, density, method): mean NE, CI, layers, paired diff."""
    rows = []
    keys = sorted({(r["model"], r["granularity"], r["density"]) for r in runs},
                  key=lambda k: (k[0], k[1], -k[2]))
    for model, gran, density in keys:
        cell = [r for r in runs if (r["model"], r["granularity"], r["density"])
                == (model, gran, density)]
        methods = [m for m in METHODS if any(r["method"] == m for r in cell)]
        by = {m: {r["seed"]: r for r in cell if r["method"] == m} for m in methods}
        means = {m: statistics.fmean(r["ne"] for r in by[m].values()) for m in methods}
        others = [m for m in methods if m != "learned"]
        best_other = min(others, key=means.get) if others else None
        for m in methods:
            ne = [by[m][s]["ne"] for s in sorted(by[m])]
            mean, ci = mean_ci(ne)
            layers = sorted(next(iter(by[m].values()))["layers"])
            runs_m = list(by[m].values())
            row = {"model": model, "granularity": gran, "density": density, "method": m,
                   "seeds": len(ne), "ne_mean": mean, "ne_ci95": ci,
                   "dense_ne_mean": statistics.fmean(dense[model]),
                   "rank": 1 + sorted(means.values()).index(means[m]),
                   "prune_s_mean": statistics.fmean(r["prune_s"] for r in by[m].values()),
                   "layers": "/".join(f"{statistics.fmean(r['layers'][f] for r in runs_m):.3f}"
                                      for f in layers)}
            if m == "learned" and best_other is not None:
                seeds = sorted(set(by["learned"]) & set(by[best_other]))
                diff = [by["learned"][s]["ne"] - by[best_other][s]["ne"] for s in seeds]
                d_mean, d_ci = mean_ci(diff)
                row.update({"best_other": best_other, "diff_mean": d_mean, "diff_ci95": d_ci,
                            "significant": bool(d_mean + d_ci < 0 or d_mean - d_ci > 0)})
            rows.append(row)
    return rows


def markdown(rows: list[dict], model: str, granularity: str) -> str:
    cells = [r for r in rows if r["model"] == model and r["granularity"] == granularity]
    if not cells:
        return ""
    densities = sorted({r["density"] for r in cells}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in cells)]
    seeds = max(r["seeds"] for r in cells)
    lines = [f"{model}, {granularity}: held-out NE, mean ± 95% CI over {seeds} seeds (dense "
             f"reference {cells[0]['dense_ne_mean']:.4f}); below: mean per-layer densities",
             "", "| method | " + " | ".join(f"d={d:g}" for d in densities) + " |",
             "|---" * (len(densities) + 1) + "|"]
    for m in methods + ["Δ learned"]:
        out = []
        for d in densities:
            if m == "Δ learned":
                r = next((r for r in cells if r["density"] == d and r["method"] == "learned"
                          and "diff_mean" in r), None)
                out.append("" if r is None else
                           f"{r['diff_mean']:+.4f} ± {r['diff_ci95']:.4f} vs {r['best_other']}"
                           + (" *" if r["significant"] else ""))
                continue
            r = next((r for r in cells if r["density"] == d and r["method"] == m), None)
            out.append("" if r is None else
                       f"{'**' if r['rank'] == 1 else ''}{r['ne_mean']:.4f}"
                       f"{'**' if r['rank'] == 1 else ''} ± {r['ne_ci95']:.4f}<br>{r['layers']}")
        if any(out):
            lines.append(f"| {m} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def read_runs(paths: Sequence[str]) -> tuple[list[dict], dict[str, list[float]]]:
    """Runs (and dense references) back from ``*_runs.csv`` files written by this script.

    A run of a later file replaces the same (model, seed, granularity, density, method) of an
    earlier one, so a rerun of some methods (``--methods learned``) can be merged with a full
    run; the pairing is checked: both files must hold the same dense reference for a seed (to
    a relative ``PAIRED_RTOL``).
    """
    by_key: dict[tuple, dict] = {}
    refs: dict[tuple[str, int], float] = {}
    for source, path in enumerate(paths):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                r = {"model": row["model"], "seed": int(row["seed"]), "source": source,
                     "granularity": row["granularity"], "density": float(row["density"]),
                     "method": row["method"], "ne": float(row["ne"]),
                     "achieved": float(row["achieved"]), "prune_s": float(row["prune_s"]),
                     "total_s": float(row["total_s"]),
                     "layers": {k.split("/", 1)[1]: float(v) for k, v in row.items()
                                if k.startswith("density/") and v not in ("", None)}}
                if r["method"] == "dense":
                    old = refs.setdefault((r["model"], r["seed"]), r["ne"])
                    # Not bit-equality: a kernel's summation order (the DLRM's interaction
                    # at inference) moves the held-out NE of the same model by ~1e-9.
                    if not math.isclose(old, r["ne"], rel_tol=PAIRED_RTOL, abs_tol=0.0):
                        raise ValueError(f"{path}: {r['model']} seed {r['seed']} has dense "
                                         f"reference {r['ne']!r}, another file {old!r}: not "
                                         "the same setup, the runs are not paired")
                else:
                    key = (r["model"], r["seed"], r["granularity"], r["density"], r["method"])
                    by_key[key] = r
    dense: dict[str, list[float]] = {}
    for (model, _), ne in sorted(refs.items()):
        dense.setdefault(model, []).append(ne)
    return list(by_key.values()), dense


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, cell by cell: learned lowest mean NE; significant wins."""
    lines = []
    for model in sorted({r["model"] for r in rows}):
        for gran in sorted({r["granularity"] for r in rows if r["model"] == model}):
            cells = [r for r in rows if (r["model"], r["granularity"]) == (model, gran)
                     and r["method"] == "learned" and "diff_mean" in r]
            best = [r["density"] for r in cells if r["rank"] == 1]
            sig = [r["density"] for r in cells if r["significant"] and r["diff_mean"] < 0]
            lines.append(f"{model} {gran}: learned lowest mean NE at {len(best)}/{len(cells)} "
                         f"densities {best}; significantly better at {sig}")
    return lines


def timing_ratio(runs: list[dict]) -> str:
    """``learned`` / ``gmp`` transition time over the cells (granularity, density, seed) where
    both ran in the same run (the same file): times of runs of other days and loads do not
    compare."""
    by = {(r["granularity"], r["density"], r["seed"], r["method"]): r for r in runs}
    pairs = [(r["prune_s"], by[k[:3] + ("gmp",)]["prune_s"]) for k, r in by.items()
             if k[3] == "learned" and k[:3] + ("gmp",) in by
             and by[k[:3] + ("gmp",)].get("source") == r.get("source")]
    if not pairs:
        return "not measured (no gmp and learned runs of the same file)"
    lrn, gmp = statistics.fmean(a for a, _ in pairs), statistics.fmean(b for _, b in pairs)
    return f"{lrn / gmp:.2f} ({lrn:.2f} s vs {gmp:.2f} s, {len(pairs)} runs of the same files)"


def print_report(runs: list[dict], dense: dict[str, list[float]], models: Sequence[str],
                 granularities: Sequence[str]) -> list[dict]:
    """Print the tables, the targets and the learned/gmp transition time of ``runs`` (pruned
    runs; ``dense``: the references per model); returns the summary rows."""
    rows = summarize(runs, dense)
    for model in models:
        for gran in granularities:
            text = markdown(rows, model, gran)
            if text:
                print("\n" + text)
    print()
    for line in targets(rows):
        print(line)
    for model in models:
        line = timing_ratio([r for r in runs if r["model"] == model])
        print(f"{model}: transition wall time learned/gmp = {line}")
    return rows


def report(paths: Sequence[str], out: str) -> list[dict]:
    """Print the tables and targets of finished runs; write the combined summary CSV."""
    runs, dense = read_runs(paths)
    rows = print_report(runs, dense, sorted(dense), ("block", "element"))
    if out:
        write_csv(Path(out + "_summary.csv"), rows)
    return rows
