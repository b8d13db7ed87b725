"""benchmarks/bench_quality.py: the seeds it runs and the pooling of several runs."""

from __future__ import annotations

import csv

import pytest
from conftest import load_benchmark


def test_bench_quality_runs_the_seeds_asked_for(tmp_path) -> None:
    """--seed picks the first seed, so two runs of disjoint seeds can be pooled."""
    bench = load_benchmark("bench_quality")
    out = tmp_path / "quality"
    args = ["--seeds", "1", "--seed", "2", "--drifts", "none", "--periods", "3",
            "--samples-per-period", "1024", "--batch-size", "256", "--prune-steps", "2",
            "--control-strategies", "prune_once,d2s,ad2s", "--out", str(out)]
    assert bench.main(args) == 0
    with (out / "quality_none.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["seed"] for r in rows} == {"2"}
    assert {r["strategy"] for r in rows} == {"dense", "prune_once", "d2s", "ad2s"}
    # Each regeneration of a period with its trigger (d2s: on schedule after period 1).
    regen = {(r["strategy"], r["period"]): (int(r["regenerations"]), r["reasons"]) for r in rows}
    assert regen[("d2s", "1")] == (1, "schedule") and regen[("d2s", "0")] == (0, "")
    for bad in (["--seeds", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            bench.main([*bad, "--out", str(out)])
    # The run's CSV pools with itself (every shared row agrees) ...
    assert bench.main(["--pool", str(out / "quality_none.csv"), str(out / "quality_none.csv")]) == 0


def _quality_csv(path, rows) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "strategy", "period", "scored", "ne", "rel_ne_loss", "regenerations"])
        w.writerows(rows)


def test_bench_quality_pools_runs_paired_and_refuses_unpaired_ones(tmp_path, capsys) -> None:
    bench = load_benchmark("bench_quality")
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    # Run a: seed 0 with ad2s and x; run b: seed 1 with ad2s, and seed 0's dense row again.
    _quality_csv(a, [[0, "dense", 0, False, "0.9", "0", 0], [0, "dense", 1, True, "0.8", "0", 0],
                     [0, "ad2s", 1, True, "0.81", "0.0125", 2],
                     [0, "x", 1, True, "0.84", "0.05", 1], [0, "x", 0, False, "0.9", "0", 0]])
    _quality_csv(b, [[0, "dense", 1, True, "0.8", "0", 0], [1, "dense", 1, True, "0.5", "0", 0],
                     [1, "ad2s", 1, True, "0.51", "0.02", 0]])
    rows = bench.read_pooled([a, b])
    assert len(rows) == 7  # the repeated dense row counted once
    lines = bench.pool_table(rows, "ad2s")
    ad2s = next(line for line in lines if line.split()[0] == "ad2s")
    x = next(line for line in lines if line.split()[0] == "x")
    # ad2s over 2 seeds: mean of 1.25% and 2% = 1.625%; 1 regeneration a seed.
    assert ad2s.split()[1:3] == ["2", "+1.62%"] and ad2s.split()[-1] == "1.0"
    # x ran seed 0 only: 5% loss, 3.75 points behind ad2s there, which was better on 1 of 1.
    assert x.split()[1:3] == ["1", "+5.00%"]
    assert "+3.75%" in x and "0/1" in x
    _quality_csv(c, [[0, "dense", 1, True, "0.7999", "0", 0]])
    with pytest.raises(ValueError, match=r"seed 0 dense period 1 has NE 0\.7999"):
        bench.read_pooled([a, c])
    with pytest.raises(SystemExit):
        bench.main(["--pool", str(a), str(c)])
    assert "not the same run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reference strategy 'd2s'"):
        bench.pool_table(rows, "d2s")


def test_bench_quality_reference_is_a_strategy_of_the_run(tmp_path) -> None:
    """--reference: the run compares with it, and refuses a list without it."""
    bench = load_benchmark("bench_quality")
    out = tmp_path / "quality"
    base = ["--seeds", "1", "--drifts", "none", "--periods", "2", "--samples-per-period",
            "1024", "--batch-size", "256", "--prune-steps", "2", "--out", str(out)]
    with pytest.raises(SystemExit):
        bench.main([*base, "--control-strategies", "prune_once,ad2s",
                    "--reference", "ad2s:min_interval=3"])
    assert bench.main([*base, "--control-strategies", "prune_once,ad2s:min_interval=3",
                       "--reference", "ad2s:min_interval=3"]) == 0
    with (out / "quality_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["reference"] for r in rows} == {"ad2s:min_interval=3"}
    own = next(r for r in rows if r["strategy"] == "ad2s:min_interval=3")
    assert float(own["minus_reference"]) == 0.0


def test_summary_rows_append_and_widen_an_older_file(tmp_path) -> None:
    bench = load_benchmark("bench_quality")
    path = tmp_path / "summary.csv"
    bench.append_rows(path, [{"a": 1, "b": 2}])
    bench.append_rows(path, [{"a": 3, "b": 4}])
    bench.append_rows(path, [{"a": 5, "c": 6}])  # new columns: the old rows are kept
    with path.open() as f:
        assert list(csv.reader(f)) == [["a", "b", "c"], ["1", "2", ""], ["3", "4", ""],
                                       ["5", "", "6"]]
