"""Turn a run's raw results into the summary table, results.json, periods.csv and plots.

A period counts in the means only if it was scored (after the warm-up) and its NE is defined:
it has samples, and both clicks and non-clicks (NE divides by the entropy of the period's CTR,
0 for a single class: one sample per period once printed NE 248334). Other periods are listed
with the reason (:func:`unscored_reason`), their relative NE is left empty, and a run with no
scorable period at all has no means (:func:`scored_anything` is False; the CLI exits non-zero).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from adsparse.metrics import relative_ne

__all__ = ["format_table", "scored_anything", "summarize", "unscored_reason", "write_report"]


def _dense_name(results: dict[str, Any]) -> str:
    return next(n for n, s in results["strategies"].items() if s["kind"] == "dense")


def unscored_reason(row: dict[str, Any]) -> str | None:
    """Why a period's metrics row does not count in the means, or ``None`` if it does."""
    if not row.get("scored"):
        return "warm-up"
    count = row.get("count") or 0
    if count == 0:
        return "no samples"
    ctr = row.get("ctr")
    if ctr is None or not 0.0 < ctr < 1.0:
        kind = "non-clicks" if ctr == 0 else "clicks"
        return f"NE undefined: {count} sample(s), all {kind}"
    ne = row.get("ne")
    if ne is None or not math.isfinite(ne):
        return "NE not finite"
    return None


def _rel(value: float | None, ref: float | None) -> float:
    """:func:`adsparse.metrics.relative_ne`, NaN where either is missing, not finite, or
    ``ref`` is 0."""
    if value is None or ref is None or not (math.isfinite(value) and math.isfinite(ref)) \
            or ref == 0:
        return math.nan
    return relative_ne(value, ref)


def scored_anything(results: dict[str, Any]) -> bool:
    """Whether at least one period of the run counts in the means."""
    rows = results["strategies"][_dense_name(results)]["periods"]
    return any(unscored_reason(r) is None for r in rows)


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per strategy: mean NE over the scored periods (after the warm-up, NE defined), relative
    NE loss vs dense, worst period, the periods left out and why, regenerations, serving
    density, per-layer densities, training time."""
    ref_name = _dense_name(results)
    ref_rows = {r["period"]: r for r in results["strategies"][ref_name]["periods"]}
    ref = {p: r["ne"] for p, r in ref_rows.items()}
    out = {}
    for name, s in results["strategies"].items():
        left_out = {}
        for r in s["periods"]:
            reason = unscored_reason(r) or unscored_reason(ref_rows.get(r["period"], {}))
            if reason is not None:
                left_out[r["period"]] = reason
        scored = [r for r in s["periods"] if r["period"] not in left_out]
        mean_ne = sum(r["ne"] for r in scored) / len(scored) if scored else math.nan
        ref_mean = sum(ref[r["period"]] for r in scored) / len(scored) if scored else math.nan
        gaps = [_rel(r["ne"], ref[r["period"]]) for r in scored]
        worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
        out[name] = {
            "kind": s["kind"], "mean_ne": mean_ne,
            "rel_ne_loss": _rel(mean_ne, ref_mean),
            "scored_periods": len(scored), "unscored_periods": left_out,
            "stream_ne": s["stream"]["ne"], "stream_auc": s["stream"]["auc"],
            "worst_period": None if worst is None else scored[worst]["period"],
            "worst_rel_ne_loss": None if worst is None else gaps[worst],
            # The warm-up model is not a regeneration of the paradigm, it is its start.
            "regenerations": sum(1 for g in s["regenerations"] if g["reason"] != "warmup"),
            "handovers": sum(1 for h in s.get("handovers", []) if h["outcome"] == "won"),
            "regeneration_cost_periods": s.get("regeneration_cost_periods"),
            "serving_density": s["serving_density"],
            "layer_densities": s["layer_densities"], "train_time_s": s["train_time_s"],
        }
    return out


def format_table(results: dict[str, Any]) -> str:
    """The end-of-run table, one row per strategy, plus per-layer densities below it."""
    summary = summarize(results)
    header = (f"{'strategy':<24}{'mean NE':>9}{'rel NE':>9}{'worst (period)':>18}{'regen':>7}"
              f"{'won':>5}{'cost':>6}{'density':>9}{'train s':>9}")
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        worst = ("-" if s["worst_period"] is None
                 else f"{100 * s['worst_rel_ne_loss']:+.2f}% ({s['worst_period']})")
        if s["scored_periods"]:
            means = f"{s['mean_ne']:>9.4f}{100 * s['rel_ne_loss']:>+8.2f}%"
        else:
            means = f"{'-':>9}{'-':>9}"
        cost = s["regeneration_cost_periods"]
        cost = "-" if cost is None else f"{cost:.2f}"
        lines.append(f"{name:<24}{means}"
                     f"{worst:>18}{s['regenerations']:>7}{s['handovers']:>5}{cost:>6}"
                     f"{s['serving_density']:>9.3f}{s['train_time_s']:>9.1f}")
    lines.append("")
    lines.append("mean NE and rel NE over the scored periods (after the warm-up); rel NE = "
                 "(NE - NE_dense) / NE_dense; regen = regenerations after the warm-up, won = "
                 "challengers that took over; cost = one regeneration in periods of dense "
                 "training; density = kept share of MLP weights.")
    left_out = summary[_dense_name(results)]["unscored_periods"]
    if left_out:
        lines.append("periods not scored: " + "; ".join(
            f"{p} ({why})" for p, why in sorted(left_out.items())))
    for name, s in summary.items():
        if s["layer_densities"]:
            layers = ", ".join(f"{k}={v:.3f}" for k, v in s["layer_densities"].items())
            lines.append(f"  {name} layers: {layers}")
    return "\n".join(lines)


def _write_csv(results: dict[str, Any], path: Path) -> None:
    ref_name = _dense_name(results)
    ref = {r["period"]: r["ne"] for r in results["strategies"][ref_name]["periods"]}
    fields = ["strategy", "period", "scored", "ne", "rel_ne_loss", "auc", "calibration",
              "logloss", "count", "ctr", "serving_density", "regenerations", "not_scored"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for name, s in results["strategies"].items():
            regen = {}
            for g in s["regenerations"]:
                regen[g["period"]] = regen.get(g["period"], 0) + 1
            for r in s["periods"]:
                row = {k: r.get(k) for k in fields if k in r}
                why = unscored_reason(r)
                gap = _rel(r["ne"], ref[r["period"]])
                row.update(strategy=name, regenerations=regen.get(r["period"], 0),
                           not_scored=why or "",
                           rel_ne_loss="" if math.isnan(gap) else gap)
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
        gaps = [100 * _rel(r["ne"], ref[r["period"]]) for r in s["periods"]]
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
    if len(results["strategies"]) > 1:  # a dense-only run has no line to label
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
