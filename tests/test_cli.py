"""The ``adsparse`` command: a tiny run writes its files, bad input fails in one line, a killed
run resumes to the same numbers without losing or repeating a period."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from adsparse.cli import main
from adsparse.online.trainer import EXIT_AFTER_CODE, EXIT_AFTER_ENV

TINY = ["run", "--periods", "3", "--samples-per-period", "256", "--batch-size", "64",
        "--max-table-rows", "40", "--prune-steps", "2", "--no-progress", "--seed", "5"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """``main`` sets the torch thread count (``--threads``); keep it from leaking into others."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adsparse.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_run_writes_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--strategies", "d2s:r=2,ad2s", "--density", "0.25", "--out",
                 str(out)]) == 0
    table = capsys.readouterr().out
    for name in ("dense", "d2s:r=2", "ad2s", "rel NE", "regen"):
        assert name in table
    for f in ("results.json", "periods.csv", "ne_over_time.png", "layer_density.png"):
        assert (out / f).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["strategies"]) == {"dense", "d2s:r=2", "ad2s"}
    assert res["config"]["density"] == 0.25
    rows = list(csv.DictReader((out / "periods.csv").open()))
    assert len(rows) == 3 * 3
    dense_rows = [r for r in rows if r["strategy"] == "dense"]
    assert all(float(r["rel_ne_loss"]) == 0.0 for r in dense_rows)
    summary = res["summary"]["d2s:r=2"]
    assert summary["regenerations"] == 1  # warm-up model at the end of period 0, then period 2
    assert summary["serving_density"] < 0.35


@pytest.mark.parametrize("args, message", [
    (["run", "--density", "1.5"], "--density"),
    (["run", "--density", "abc"], "--density"),
    (["run", "--strategies", "dense,magic"], "unknown strategy 'magic'"),
    (["run", "--strategies", "d2s:r=0"], "r >= 1"),
    (["run", "--block-size", "16x0"], "--block-size"),
    (["run", "--data", "criteo"], "needs --paths"),
    (["run", "--data", "criteo", "--paths", "/nonexistent/day_0"], "no such file"),
    (["run", "--periods", "1"], "warm-up"),
    (["run", "--device", "tpu"], "--device"),
    (["run", "--nproc", "0"], "--nproc"),
    (["run", "--frobnicate"], "unrecognized"),
    (["bench", "nothing"], "invalid choice"),
    ([], "required"),
])
def test_bad_input_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adsparse: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_bad_input_from_the_console(tmp_path):
    proc = _cli(["run", "--density", "0"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    args = [*TINY, "--samples-per-period", "192", "--strategies", "prune_once,d2s,ad2s"]
    straight = _cli([*args, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    ckpt = tmp_path / "ckpt"
    killed = _cli([*args, "--out", str(tmp_path / "a"), "--checkpoint-dir", str(ckpt)],
                  env={EXIT_AFTER_ENV: "0"})
    assert killed.returncode == EXIT_AFTER_CODE, killed.stderr
    assert not (tmp_path / "a").exists() and (ckpt / "online.pt").exists()
    resumed = _cli([*args, "--out", str(tmp_path / "b"), "--checkpoint-dir", str(ckpt)])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for name, s in a["strategies"].items():
        got = b["strategies"][name]
        assert [r["period"] for r in got["periods"]] == [0, 1, 2]  # none lost or repeated
        for ra, rb in zip(s["periods"], got["periods"]):
            assert rb["count"] == ra["count"]
            assert rb["ne"] == pytest.approx(ra["ne"], rel=1e-5)
            assert rb["auc"] == pytest.approx(ra["auc"], abs=1e-4)
        assert [g["reason"] for g in got["regenerations"]] == [
            g["reason"] for g in s["regenerations"]]
    # A different command on the same checkpoint is refused in one line.
    other = _cli([*args, "--density", "0.5", "--checkpoint-dir", str(ckpt)])
    assert other.returncode == 1 and "different settings" in other.stderr


def test_bench_runs_the_benchmark_file(tmp_path, monkeypatch, capsys):
    import adsparse.cli as cli

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_serving.py").write_text(
        "def main(argv):\n    print('ran', argv)\n    return 0\n")
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert main(["bench", "serving", "--x", "1"]) == 0
    assert "ran ['--x', '1']" in capsys.readouterr().out
    assert main(["bench", "kernels"]) == 2  # missing file: one-line error
    assert cli._load_benchmark("serving").__file__ == str(bench / "bench_serving.py")


def test_run_on_criteo_files(tmp_path, capsys):
    import gzip
    import random

    rng = random.Random(7)
    paths = []
    for day in range(3):
        lines = []
        for _ in range(150):
            ints = [str(rng.randint(0, 60)) if rng.random() > 0.1 else "" for _ in range(13)]
            cats = [f"{rng.randint(0, 300):08x}" if rng.random() > 0.1 else "" for _ in range(26)]
            lines.append("\t".join([str(int(rng.random() < 0.25)), *ints, *cats]))
        lines.insert(40, "not\ta\tcriteo\trow")  # malformed: skipped and counted, not fatal
        path = tmp_path / f"day_{day}.gz"
        with gzip.open(path, "wt") as f:
            f.write("\n".join(lines) + "\n")
        paths.append(str(path))
    out = tmp_path / "run"
    assert main(["run", "--data", "criteo", "--paths", *paths, "--batch-size", "50",
                 "--max-table-rows", "64", "--prune-steps", "2", "--no-progress",
                 "--strategies", "d2s", "--out", str(out)]) == 0
    assert "malformed rows skipped: 3" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    periods = res["strategies"]["d2s"]["periods"]
    assert [r["period"] for r in periods] == [0, 1, 2]  # one file per period
    assert [r["count"] for r in periods] == [150, 150, 150]


def test_sigkill_mid_period_resumes_to_the_same_numbers(tmp_path):
    """A run killed at an arbitrary point (here: SIGKILL inside the period after the first
    checkpoint) resumes from that checkpoint to the uninterrupted run's numbers."""
    import signal
    import time

    args = [*TINY, "--periods", "4", "--samples-per-period", "1024",
            "--strategies", "prune_once,ad2s"]
    straight = _cli([*args, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "adsparse.cli", *args, "--out",
                             str(tmp_path / "a"), "--checkpoint-dir", str(ckpt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (ckpt / "online.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)
    time.sleep(0.05)  # into the next period
    killed_mid_run = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli([*args, "--out", str(tmp_path / "b"), "--checkpoint-dir", str(ckpt)])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for name, s in a["strategies"].items():
        got = b["strategies"][name]
        assert [r["period"] for r in got["periods"]] == [0, 1, 2, 3]
        for ra, rb in zip(s["periods"], got["periods"]):
            assert rb["count"] == ra["count"]
            assert rb["ne"] == pytest.approx(ra["ne"], rel=1e-5)
    assert killed_mid_run, "the run finished before it could be killed; make it longer"
