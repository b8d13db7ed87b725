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


def test_no_sort_units_reaches_the_run(tmp_path):
    for flag, want in (([], True), (["--no-sort-units"], False)):
        out = tmp_path / f"run{len(flag)}"
        assert main([*TINY, "--periods", "2", "--strategies", "prune_once", *flag, "--out",
                     str(out), "--no-progress"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["config"]["sort_units"] is want


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


@pytest.mark.parametrize("change, option", [
    (["--batch-size", "32"], "batch_size"),
    (["--samples-per-period", "128"], "samples_per_period"),
    (["--max-table-rows", "30"], "max_table_rows"),
    (["--density", "0.5"], "config.density"),
])
def test_resume_refuses_changed_options(tmp_path, change, option):
    """A checkpoint written with other data or model options is refused, naming them."""
    ckpt = tmp_path / "ckpt"
    first = _cli([*TINY, "--periods", "2", "--strategies", "prune_once", "--out",
                  str(tmp_path / "a"), "--checkpoint-dir", str(ckpt)])
    assert first.returncode == 0, first.stderr
    other = _cli([*TINY, "--periods", "2", "--strategies", "prune_once", *change,
                  "--out", str(tmp_path / "b"), "--checkpoint-dir", str(ckpt)])
    assert other.returncode == 1
    assert "different settings" in other.stderr and option in other.stderr
    assert other.stderr.strip().count("\n") == 0 and "Traceback" not in other.stderr


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


def _criteo_files(folder, days: int, garbage: tuple[int, ...] = (), rows: int = 150
                  ) -> list[str]:
    """``days`` gzipped Criteo files of ``rows`` rows plus one malformed line each; the days in
    ``garbage`` hold nothing but malformed lines."""
    import gzip
    import random

    rng = random.Random(7)
    paths = []
    for day in range(days):
        lines = []
        for _ in range(rows):
            ints = [str(rng.randint(0, 60)) if rng.random() > 0.1 else "" for _ in range(13)]
            cats = [f"{rng.randint(0, 300):08x}" if rng.random() > 0.1 else "" for _ in range(26)]
            lines.append("\t".join([str(int(rng.random() < 0.25)), *ints, *cats]))
        lines.insert(40, "not\ta\tcriteo\trow")  # malformed: skipped and counted, not fatal
        if day in garbage:
            lines = ["garbage"] * len(lines)
        path = folder / f"day_{day}.gz"
        with gzip.open(path, "wt") as f:
            f.write("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


CRITEO = ["--batch-size", "50", "--max-table-rows", "64", "--prune-steps", "2", "--no-progress"]


def test_run_on_criteo_files(tmp_path, capsys):
    paths = _criteo_files(tmp_path, 3)
    out = tmp_path / "run"
    assert main(["run", "--data", "criteo", "--paths", *paths, "--batch-size", "50",
                 "--max-table-rows", "64", "--prune-steps", "2", "--no-progress",
                 "--strategies", "d2s", "--out", str(out)]) == 0
    assert "malformed rows skipped: 3" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    periods = res["strategies"]["d2s"]["periods"]
    assert [r["period"] for r in periods] == [0, 1, 2]  # one file per period
    assert [r["count"] for r in periods] == [150, 150, 150]


def test_resumed_criteo_run_counts_every_malformed_row(tmp_path, capsys):
    """The malformed-row total after a resume equals the uninterrupted run's: the checkpoint
    carries the per-period counts of the periods read before the stop."""
    from adsparse.data import CriteoStream
    from adsparse.online import OnlineConfig, OnlineTrainer, default_components

    paths = _criteo_files(tmp_path, 3)

    def trainer(stream: CriteoStream, **kw) -> OnlineTrainer:
        comps = default_components(stream.num_dense, stream.embedding_sizes,
                                   model={"embedding_dim": 8, "bottom_mlp": [16, 8],
                                          "top_mlp": [16, 1]})
        cfg = OnlineConfig(strategies=["dense"])
        return OnlineTrainer(stream, cfg, comps, progress=False, **kw)

    straight = CriteoStream(paths, batch_size=50, hash_sizes=64)
    trainer(straight).run()

    def crash(p: int) -> None:
        if p == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        trainer(CriteoStream(paths, batch_size=50, hash_sizes=64),
                checkpoint_dir=str(tmp_path / "ckpt"), on_period_end=crash).run()
    resumed = CriteoStream(paths, batch_size=50, hash_sizes=64)
    trainer(resumed, checkpoint_dir=str(tmp_path / "ckpt")).run()
    assert straight.malformed_rows == 3
    assert resumed.malformed_rows == straight.malformed_rows


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


# ----------------------------------------------------------------------------- reliability
@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the run itself starts: the checks must come before any work."""
    import adsparse.online

    def refuse(exp):
        raise AssertionError("the run started before the bad input was noticed")

    monkeypatch.setattr(adsparse.online, "run_experiment", refuse)


@pytest.mark.parametrize("args, env, message", [
    (["--block-size", "1000"], {}, "no prunable layers"),
    (["--density", "1e-9"], {}, "density 1e-09"),
    (["--block-size", str(2**63)], {}, "--block-size"),
    (["--seed", "-1"], {}, "--seed: expected an integer in [0, 4294967295]"),
    (["--rows-per-period", "10"], {}, "--rows-per-period: only for --data criteo"),
    ([], {"ADSPARSE_CPU_ISA": "bogus"}, "ADSPARSE_CPU_ISA must be one of"),
    ([], {"ADSPARSE_BACKEND": "bogus"}, "ADSPARSE_BACKEND must be one of"),
])
def test_bad_settings_fail_before_the_run(args, env, message, no_run, monkeypatch, tmp_path,
                                          capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main([*TINY, *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adsparse: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_output_paths_are_checked_before_the_run(no_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    cases = [
        (["--out", str(a_file)], "is not a folder"),
        (["--out", "/proc/adsparse-x"], "cannot write into /proc/adsparse-x"),
        (["--out", str(a_file / "sub")], "is not a folder"),
        (["--out", str(earlier)], "already holds files"),
        (["--out", str(tmp_path / "o"), "--checkpoint-dir", str(a_file / "ckpt")],
         "--checkpoint-dir"),
        (["--out", str(tmp_path / "o"), "--checkpoint-dir", "/proc/adsparse-x"],
         "--checkpoint-dir: cannot write"),
    ]
    for args, message in cases:
        assert main([*TINY, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (args, err)
    assert (earlier / "results.json").read_text() == "{}"  # earlier results untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "earlier"]  # no leftovers


def test_criteo_options_that_would_be_ignored_are_refused(no_run, tmp_path, capsys):
    paths = _criteo_files(tmp_path, 2, rows=20)
    cases = [
        (["--paths", *paths, "--periods", "5"], "--periods: not for --data criteo"),
        (["--paths", *paths, "--samples-per-period", "64"], "--samples-per-period: not for"),
        (["--paths", paths[0]], "all warm-up"),  # one file: every period is a warm-up
        (["--paths", *paths, "--rows-per-period", "42"], "nothing to score"),  # 42 lines
    ]
    for args, message in cases:
        assert main(["run", "--data", "criteo", *args, *CRITEO]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (args, err)


def test_an_empty_period_is_reported_and_left_out_of_the_means(tmp_path, capsys):
    paths = _criteo_files(tmp_path, 3, garbage=(1,))
    out = tmp_path / "run"
    assert main(["run", "--data", "criteo", "--paths", *paths, *CRITEO, "--strategies", "d2s",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "1 (no samples)" in table and "nan" not in table
    res = json.loads((out / "results.json").read_text())
    summary = res["summary"]["d2s"]
    assert summary["scored_periods"] == 1 and summary["unscored_periods"]["1"] == "no samples"
    assert summary["mean_ne"] == res["strategies"]["d2s"]["periods"][2]["ne"]


def test_a_run_that_scores_nothing_exits_non_zero(tmp_path, capsys):
    paths = _criteo_files(tmp_path, 2, garbage=(1,), rows=60)
    assert main(["run", "--data", "criteo", "--paths", *paths, *CRITEO, "--strategies", "dense",
                 "--out", str(tmp_path / "a")]) == 1
    assert "no period could be scored" in capsys.readouterr().err
    # One sample per period: a single label class, NE undefined (it printed NE 248334).
    assert main([*TINY, "--samples-per-period", "1", "--batch-size", "1", "--strategies", "dense",
                 "--out", str(tmp_path / "b")]) == 1
    captured = capsys.readouterr()
    assert "no period could be scored" in captured.err and "NE undefined" in captured.out
    assert "248334" not in captured.out


def test_damaged_criteo_files_never_end_in_a_traceback(tmp_path, capsys):
    paths = _criteo_files(tmp_path, 3)
    day1 = tmp_path / "day_1.gz"
    day1.write_bytes(day1.read_bytes()[: day1.stat().st_size // 2])  # truncated mid-stream
    assert main(["run", "--data", "criteo", "--paths", *paths, *CRITEO, "--strategies", "d2s",
                 "--out", str(tmp_path / "a")]) == 0
    assert "malformed rows skipped: 4" in capsys.readouterr().out  # 3 rows + the lost tail
    (tmp_path / "day_2.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")  # unreadable from the start
    assert main(["run", "--data", "criteo", "--paths", *paths, *CRITEO, "--strategies", "d2s",
                 "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot read Criteo file" in err and "day_2.gz" in err and "\n" not in err
