"""Where the benchmark scripts write their CSV tables, and the facts every row carries.

Used by ``benchmarks/bench_kernels.py``, ``bench_serving.py`` and ``bench_gpu.py``. A table is
only worth keeping with what, where and when it was measured, so every row starts with the
date, the CPU, the kernel path, the thread count, the torch version and the code's commit.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["default_csv", "run_facts", "write_csv"]


def default_csv(script: str | Path, name: str) -> Path:
    """The default CSV path of a benchmark script.

    ``benchmarks/results/<name>`` when the script runs from a checkout (its folder holds
    RESULTS.md), else ``./adsparse-results/<name>``: an installed wheel's scripts live in
    site-packages, which is no place for results.
    """
    here = Path(script).resolve().parent
    if (here / "RESULTS.md").is_file():
        return here / "results" / name
    return Path.cwd() / "adsparse-results" / name


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    """The checkout's short commit (with ``+dirty`` for local changes), or '' when installed."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return ""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "csrc", "adsparse_kernels", "python"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_facts(device: str | None = None) -> dict[str, str]:
    """What every row of a run shares: when, on what (``device`` overrides the CPU name)."""
    isa = (torch.ops.adsparse.selected_cpu_isa()
           if hasattr(torch.ops.adsparse, "selected_cpu_isa") else "")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device or _cpu_model(),
        "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count()),
        "isa": isa,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "commit": _commit(),
        # Other processes on the machine slow every timing: the 1-minute load at the start.
        "load": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
    }


def write_csv(path: str | Path, rows: Sequence[Mapping[str, object]],
              facts: Mapping[str, str] | None = None) -> Path:
    """Write ``rows`` to ``path``, each prefixed with ``facts``; the columns are every key of any
    row, in order of first appearance (a row lacking one leaves its cell empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = facts or {}
    fields = list(facts)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**facts, **row})
    return path
