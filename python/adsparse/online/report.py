"""Turn a run's raw results into the summary table, results.json, periods.csv and plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["format_table", "summarize", "write_report"]


def _dense_name(results: dict[str, Any]) -> str:
    return next(n for n, s in results["strategies"].items() if s["kind"] == "dense")


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per strategy: mean NE over the scored periods (after the warm-up), relative NE loss vs
    dense, worst period, regenerations, serving density, per-layer densities, training time."""
    ref_name = _dense_name(results)
    ref = {r["period"]: r["ne"] for r in results["strategies"][ref_name]["periods"]}
    out = {}
    for name, s in results["strategies"].items():
        scored = [r for r in s["periods"] if r["scored"]]
        mean_ne = sum(r["ne"] for r in scored) / len(scored) if scored else math.nan
        ref_mean = sum(ref[r["period"]] for r in scored) / len(scored) if scored else math.nan
        gaps = [(r["ne"] - ref[r["period"]]) / ref[r["period"]] for r in scored]
        worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
        out[name] = {
            "kind": s["kind"], "mean_ne": mean_ne,
            "rel_ne_loss": (mean_ne - ref_mean) / ref_mean if scored else math.nan,
            "stream_ne": s["stream"]["ne"], "stream_auc": s["stream"]["auc"],
            "worst_period": None if worst is None else scored[worst]["period"],
            "worst_rel_ne_loss": None if worst is None else gaps[worst],
            # The warm-up model is not a regeneration of the paradigm, it is its start.
            "regenerations": sum(1 for g in s["regenerations"] if g["reason"] != "warmup"),
            "serving_density": s["serving_density"],
            "layer_densities": s["layer_densities"], "train_time_s": s["train_time_s"],
        }
    return out


def format_table(results: dict[str, Any]) -> str:
    """The end-of-run table, one row per strategy, plus per-layer densities below it."""
    summary = summarize(results)
    header = (f"{'strategy':<24}{'mean NE':>9}{'rel NE':>9}{'worst (period)':>18}{'regen':>7}"
              f"{'density':>9}{'train s':>9}")
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        worst = ("-" if s["worst_period"] is None
                 else f"{100 * s['worst_rel_ne_loss']:+.2f}% ({s['worst_period']})")
        lines.append(f"{name:<24}{s['mean_ne']:>9.4f}{100 * s['rel_ne_loss']:>+8.2f}%"
                     f"{worst:>18}{s['regenerations']:>7}{s['serving_density']:>9.3f}"
                     f"{s['train_time_s']:>9.1f}")
    lines.append("")
    lines.append("mean NE and rel NE over the scored periods (after the warm-up); rel NE = "
                 "(NE - NE_dense) / NE_dense; density = kept share of MLP weights.")
    for name, s in summary.items():
        if s["layer_densities"]:
            layers = ", ".join(f"{k}={v:.3f}" for k, v in s["layer_densities"].items())
            lines.append(f"  {name} layers: {layers}")
    return "\n".join(lines)


def _write_csv(results: dict[str, Any], path: Path) -> None:
    ref_name = _dense_name(results)
    ref = {r["period"]: r["ne"] for r in results["strategies"][ref_name]["periods"]}
    fields = ["strategy", "period", "scored", "ne", "rel_ne_loss", "auc", "calibration",
              "logloss", "count", "ctr", "serving_density", "regenerations"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for name, s in results["strategies"].items():
            regen = {}
            for g in s["regenerations"]:
                regen[g["period"]] = regen.get(g["period"], 0) + 1
            for r in s["periods"]:
                row = {k: r.get(k) for k in fields if k in r}
                row.update(strategy=name, regenerations=regen.get(r["period"], 0),
                           rel_ne_loss=(r["ne"] - ref[r["period"]]) / ref[r["period"]])
                writer.writerow(row)


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_name = _dense_name(results)
    ref = {r["period"]: r["ne"] for r in results["strategies"][ref_name]["periods"]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, s in results["strategies"].items():
        if name == ref_name:
            continue
        periods = [r["period"] for r in s["periods"]]
        gaps = [100 * (r["ne"] - ref[r["period"]]) / ref[r["period"]] for r in s["periods"]]
        (line,) = ax.plot(periods, gaps, marker=".", label=name)
        # A regeneration at a period end serves from the next period on; mid-period ones in it.
        marks = sorted({g["period"] + (1 if g["batch"] < 0 else 0) for g in s["regenerations"]})
        marks = [m for m in marks if m in ref]
        ys = [gaps[periods.index(m)] for m in marks]
        ax.scatter(marks, ys, marker="v", s=40, color=line.get_color(), zorder=3)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("period")
    ax.set_ylabel("NE gap to dense (%)")
    ax.set_title("NE gap to dense per period (▼ = periods served by a regenerated model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ne_over_time.png", dpi=120)
    plt.close(fig)

    summary = summarize(results)
    sparse = {n: s for n, s in summary.items() if s["layer_densities"]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if sparse:
        layers = list(next(iter(sparse.values()))["layer_densities"])
        width = 0.8 / len(sparse)
        for i, (name, s) in enumerate(sparse.items()):
            xs = [j + i * width for j in range(len(layers))]
            ax.bar(xs, [s["layer_densities"].get(layer, 0.0) for layer in layers], width,
                   label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_ylabel("density of the serving layer")
    ax.set_title("Per-layer density of the final serving models")
    fig.tight_layout()
    fig.savefig(out / "layer_density.png", dpi=120)
    plt.close(fig)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    """Write results.json (raw + summary), periods.csv and the two plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(results, summary=summarize(results))
    (out / "results.json").write_text(json.dumps(_json_safe(payload), indent=1))
    _write_csv(results, out / "periods.csv")
    _plot(results, out)
    return out
