"""A wheel install is complete: every CLI command works outside the checkout.

Fast tests (always run): the build ships the benchmark scripts as ``adsparse.benchmarks``, an
sdist carries every kernel source and header, and ``adsparse bench`` finds the scripts in the
installed package when there is no checkout. The full check builds the wheel
(the C++ extension: 2-4 minutes on 2 cores), installs it into a fresh folder and runs the CLI
from outside the checkout; it is opt-in (``ADSPARSE_TEST_WHEEL=1``, or ``make test-wheel``)
because the build would double the suite's time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest

from adsparse import cli

ROOT = Path(__file__).resolve().parent.parent


def _benchmark_files(names: list[str]) -> set[str]:
    return {n for n in names if n.startswith("adsparse/benchmarks/")}


def test_build_ships_the_benchmark_scripts(tmp_path):
    """setup.py's build copies benchmarks/ into the package: the same files, not copies kept
    in the repository."""
    out = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(out)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    shipped = {str(p.relative_to(out)) for p in out.rglob("*.py")}
    expected = {f"adsparse/benchmarks/bench_{which}.py" for which in cli.BENCHMARKS}
    assert expected <= _benchmark_files(sorted(shipped))
    assert "adsparse/benchmarks/__init__.py" in shipped
    assert {"adsparse/cli.py", "adsparse_kernels/__init__.py"} <= shipped
    for which in cli.BENCHMARKS:
        name = f"bench_{which}.py"
        assert (out / "adsparse" / "benchmarks" / name).read_bytes() == (
            ROOT / "benchmarks" / name).read_bytes()


def test_sdist_carries_what_the_build_needs(tmp_path):
    """A source distribution holds every kernel source and header (the build reads them all),
    the Triton kernels and the benchmark scripts. Built from a copy: sdist writes egg-info."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("csrc", "adsparse_kernels", "benchmarks", "python"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "results"))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True, timeout=300)
    (sdist,) = (tmp_path / "dist").glob("adsparse-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir()}
    needed |= {f"benchmarks/bench_{which}.py" for which in cli.BENCHMARKS}
    needed |= {"adsparse_kernels/__init__.py", "python/adsparse/__init__.py"}
    assert needed <= names, sorted(needed - names)


def test_bench_finds_the_installed_scripts(tmp_path, monkeypatch, capsys):
    """Without a checkout next to the package, `adsparse bench` runs adsparse.benchmarks."""
    installed = tmp_path / "site" / "adsparse" / "benchmarks"
    installed.mkdir(parents=True)
    (installed / "bench_kernels.py").write_text(
        "def main(argv):\n    print('installed kernels', argv)\n    return 3\n")
    package = types.ModuleType("adsparse.benchmarks")
    package.__path__ = [str(installed)]
    monkeypatch.setattr(cli, "_REPO", tmp_path / "no-checkout")
    monkeypatch.setitem(sys.modules, "adsparse.benchmarks", package)
    assert cli.main(["bench", "kernels", "--quick"]) == 3
    assert "installed kernels ['--quick']" in capsys.readouterr().out
    assert cli.main(["bench", "serving"]) == 2  # not shipped: one line, the path it looked at
    assert str(installed / "bench_serving.py") in capsys.readouterr().err


def test_bench_without_any_scripts_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    monkeypatch.setitem(sys.modules, "adsparse.benchmarks", None)  # import raises ImportError
    assert cli.main(["bench", "kernels"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adsparse: error: benchmark 'kernels' not found")
    assert err.count("\n") == 1


@pytest.mark.skipif(os.environ.get("ADSPARSE_TEST_WHEEL") != "1",
                    reason="builds the C++ extension (minutes): set ADSPARSE_TEST_WHEEL=1 or run "
                           "`make test-wheel`")
def test_wheel_install_runs_every_command(tmp_path):
    """Build the wheel, install it outside the checkout, run each command from elsewhere."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "-q", "-w", str(dist), str(ROOT)], check=True, timeout=1200)
    (wheel,) = dist.glob("adsparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("adsparse/_C") and n.endswith(".so") for n in names)
    assert {f"adsparse/benchmarks/bench_{w}.py" for w in cli.BENCHMARKS} <= set(names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # torch and the other dependencies come from this interpreter; adsparse only from the wheel
    # (PYTHONPATH precedes site-packages and the checkout's editable finder).
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}

    def adsparse(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "adsparse.cli", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"adsparse {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done

    where = subprocess.run([sys.executable, "-c", "import adsparse; print(adsparse.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    assert (site / "bin" / "adsparse").is_file()  # the console script
    adsparse("run", "-h")
    adsparse("run", "--periods", "2", "--samples-per-period", "256", "--batch-size", "64",
             "--max-table-rows", "40", "--prune-steps", "2", "--no-progress",
             "--strategies", "prune_once", "--out", str(work / "run"))
    assert (work / "run" / "results.json").is_file()
    adsparse("bench", "kernels", "--quick", "--threads", "1", "--budget", "0.002")
    assert (work / "adsparse-results" / "kernels_cpu.csv").is_file()
    adsparse("bench", "serving", "--quick", "--threads", "1", "--budget", "0.002")
    assert (work / "adsparse-results" / "serving.csv").is_file()
    adsparse("bench", "quality", "--seeds", "1", "--drifts", "none", "--periods", "2",
             "--samples-per-period", "256", "--batch-size", "64", "--prune-steps", "2",
             "--strategies", "prune_once,ad2s", "--out", str(work / "quality"))
