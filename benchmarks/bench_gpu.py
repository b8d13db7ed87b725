"""GPU benchmark of bsr_linear: cuBLAS dense vs torch's block-sparse path vs adsparse (Triton).

For every shape it times, with ``triton.testing.do_bench`` medians on the same GPU in the same
run:

* ``dense``: ``F.linear(x, W)`` with the masked weight stored dense (cuBLAS);
* ``torch_bsr``: torch's own block-sparse path, ``F.linear`` with a ``sparse_bsr`` weight (on CUDA
  torch sends bf16/fp16 to its Triton ``bsr_dense_addmm``); if torch refuses a case, the
  ``torch.sparse.mm(W_bsr, x.T).T`` form is tried; the column ``torch_path`` says which ran, or why
  none did;
* ``ours``: ``adsparse.ops.bsr_linear``.

Modes: ``fwd`` (forward) and ``fwd+bwd`` (forward, then backward to ``x`` and the weight: the
dense weight for cuBLAS, the stored blocks for ours, whatever torch supports for its BSR weight).
Every row first checks our forward against the dense result. A targets section follows the table.

    python benchmarks/bench_gpu.py [--out PATH] [--quick] [--budget-s 300]

The CSV (default ``benchmarks/results/kernels_gpu.csv``, from an installed wheel
``./adsparse-results/``) is written row by row, every row with the date, GPU, torch and commit.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = (4096, 1024)
BATCHES = (4096, 512, 64)
DENSITIES = (0.1, 0.05, 0.25, 0.5)
BLOCKS = (64, 32)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
TARGET = {"dtype": "bf16", "n": 4096, "batch": 4096, "block": 64, "density": 0.1}


@dataclass
class Row:
    dtype: str
    n: int
    batch: int
    block: int
    density: float
    mode: str
    dense_ms: float = math.nan
    torch_bsr_ms: float = math.nan
    ours_ms: float = math.nan
    torch_path: str = ""
    check: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def vs_dense(self) -> float:
        return self.dense_ms / self.ours_ms

    @property
    def vs_torch(self) -> float:
        return self.torch_bsr_ms / self.ours_ms


def _cases(quick: bool) -> list[tuple[str, int, int, int, float]]:
    if quick:
        cases = [(dt, n, b, blk, 0.1) for dt in DTYPES for n, b in ((4096, 4096), (1024, 512))
                 for blk in BLOCKS]
    else:
        cases = [(dt, n, b, blk, d) for dt in DTYPES for n in SIZES for b in BATCHES
                 for blk in BLOCKS for d in DENSITIES]

    # The rows the targets are judged on come first, so a time budget never cuts them.
    def priority(case) -> int:
        dt, n, b, blk, d = case
        if (dt, n, b, blk, d) == tuple(TARGET.values()):
            return 0
        return 1 if n == 1024 else 2

    return sorted(cases, key=priority)


def _bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    import triton.testing

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none,
                                         return_mode="median"))


def _torch_bsr_forward(w_bsr: torch.Tensor) -> list[tuple[str, Callable]]:
    return [
        ("F.linear", lambda x: F.linear(x, w_bsr)),
        ("sparse.mm", lambda x: torch.sparse.mm(w_bsr, x.t()).t()),
    ]


def _measure(row: Row, dtype: torch.dtype, dev: str = "cuda") -> None:
    """Fill ``row`` with the three timings of its mode and the correctness check."""
    from adsparse.layout import BlockSparseWeight
    from adsparse.ops import bsr_linear

    n = k = row.n
    grid = (n // row.block, k // row.block)
    keep = round(row.density * grid[0] * grid[1])
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool, device=dev)
    mask[torch.randperm(mask.numel(), device=dev)[:keep]] = True
    mask = mask.view(grid)
    dense = torch.randn(n, k, device=dev, dtype=dtype) / math.sqrt(k)
    w = BlockSparseWeight.from_dense(dense, (row.block, row.block), mask=mask)
    w_dense = w.to_dense()
    x = torch.randn(row.batch, k, device=dev, dtype=dtype)
    grad = torch.randn(row.batch, n, device=dev, dtype=dtype)

    # Our forward against cuBLAS on the same weight: a wrong kernel must not post a time.
    ours_y, ref_y = bsr_linear(x, w), F.linear(x, w_dense)
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    err = float((ours_y.float() - ref_y.float()).abs().max() / ref_y.float().abs().max())
    row.check = "ok" if err <= tol else f"BAD rel err {err:.1e}"

    w_bsr = w.to_sparse_bsr()
    if row.mode == "fwd":
        row.dense_ms = _bench(lambda: F.linear(x, w_dense))
        row.ours_ms = _bench(lambda: bsr_linear(x, w))
        for name, fn in _torch_bsr_forward(w_bsr):
            try:
                fn(x)
                row.torch_bsr_ms = _bench(lambda fn=fn: fn(x))
                row.torch_path = name
                break
            except Exception as exc:  # torch lacks this case: record why, go on
                row.notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        if not row.torch_path:
            row.torch_path = "n/a"
        return

    xg = x.clone().requires_grad_()
    wd = w_dense.clone().requires_grad_()
    row.dense_ms = _bench(lambda: F.linear(xg, wd).backward(grad), [xg, wd])
    values = w.values.clone().requires_grad_()
    w_train = w.with_values(values)
    row.ours_ms = _bench(lambda: bsr_linear(xg, w_train).backward(grad), [xg, values])
    # torch's BSR autograd: both gradients if it can, else the input gradient only.
    for what in ("x,W", "x"):
        wb = w_bsr.clone().requires_grad_(what == "x,W")
        for name, _ in _torch_bsr_forward(wb):
            def step(name=name, wb=wb):
                y = F.linear(xg, wb) if name == "F.linear" else torch.sparse.mm(wb, xg.t()).t()
                y.backward(grad)

            try:
                step()
                row.torch_bsr_ms = _bench(step, [xg, wb])
                row.torch_path = f"{name} (grad {what})"
                return
            except Exception as exc:  # torch lacks this case: record why, go on
                row.notes.append(f"{name} grad {what}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:60]}")
    row.torch_path = "n/a"


def _fmt(v: float, spec: str = ".3f") -> str:
    return "-" if math.isnan(v) else format(v, spec)


def _print_table(rows: list[Row]) -> None:
    head = (f"{'dtype':5} {'N=K':>5} {'B':>5} {'blk':>3} {'dens':>5} {'mode':8} {'dense ms':>9} "
            f"{'torch ms':>9} {'ours ms':>9} {'x dense':>8} {'x torch':>8} check  torch path")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.dtype:5} {r.n:5d} {r.batch:5d} {r.block:3d} {r.density:5.2f} {r.mode:8} "
              f"{_fmt(r.dense_ms):>9} {_fmt(r.torch_bsr_ms):>9} {_fmt(r.ours_ms):>9} "
              f"{_fmt(r.vs_dense, '.2f'):>8} {_fmt(r.vs_torch, '.2f'):>8} {r.check:6} "
              f"{r.torch_path}")


def _targets(rows: list[Row]) -> list[str]:
    """The issue's targets, judged on the measured rows (n/a when a row is missing)."""
    lines = []
    for mode in MODES:
        hit = [r for r in rows if r.mode == mode and (r.dtype, r.n, r.batch, r.block, r.density)
               == tuple(TARGET.values())]
        if not hit:
            lines.append(f"{mode}: target row (bf16, N=K=4096, B=4096, block 64, density 0.1) "
                         "not measured")
            continue
        r = hit[0]
        ok_dense = r.vs_dense >= 5.0
        ok_torch = (not math.isnan(r.vs_torch)) and r.vs_torch >= 1.3
        lines.append(f"{mode}: bf16 N=K=4096 B=4096 block 64 density 0.1: "
                     f"{r.vs_dense:.2f}x vs cuBLAS (target >= 5) {'PASS' if ok_dense else 'FAIL'}; "
                     f"{_fmt(r.vs_torch, '.2f')}x vs torch BSR (target >= 1.3) "
                     f"{'PASS' if ok_torch else ('n/a' if math.isnan(r.vs_torch) else 'FAIL')}")
    small = [r for r in rows if r.n == 1024 and not math.isnan(r.torch_bsr_ms)]
    slower = [r for r in small if r.ours_ms > r.torch_bsr_ms]
    worst = min((r.vs_torch for r in small), default=math.nan)
    verdict = "PASS" if small and not slower else "FAIL"
    lines.append(f"N=K=1024, never slower than torch BSR: {len(slower)} of {len(small)} rows "
                 f"slower (worst {_fmt(worst, '.2f')}x) {verdict}"
                 if small else "N=K=1024: no row with a torch BSR time")
    bad = [r for r in rows if r.check != "ok"]
    lines.append(f"correctness: {len(rows) - len(bad)} of {len(rows)} rows match cuBLAS")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status (0 also when CUDA is absent)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV file to write, directories created (default "
                             "benchmarks/results/kernels_gpu.csv in a checkout, "
                             "./adsparse-results/kernels_gpu.csv otherwise)")
    parser.add_argument("--quick", action="store_true", help="only density 0.1, two shapes")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new rows after this many seconds")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available on this machine; nothing was measured.")
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    torch.manual_seed(0)
    cases = [c for c in _cases(args.quick) if c[0] in dtypes]
    print(f"bench_gpu: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"{len(cases)} shapes x {len(MODES)} modes | tf32 off", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[Row] = []
    start = time.perf_counter()
    from adsparse._results import default_csv, run_facts  # after the CUDA check, like the ops

    args.out = args.out or default_csv(__file__, "kernels_gpu.csv")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    facts = run_facts(device=torch.cuda.get_device_name())
    names = list(asdict(Row("", 0, 0, 0, 0.0, "")))
    # Written row by row, so a run cut short by a time limit still leaves its measurements.
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*facts, *names, "vs_dense", "vs_torch"])
        for i, (dt, n, b, blk, d) in enumerate(cases):
            if time.perf_counter() - start > args.budget_s:
                print(f"bench_gpu: time budget {args.budget_s:.0f}s reached after {i} of "
                      f"{len(cases)} shapes; the table below is partial.")
                break
            for mode in MODES:
                row = Row(dt, n, b, blk, d, mode)
                try:
                    _measure(row, DTYPES[dt])
                except torch.cuda.OutOfMemoryError:
                    row.check = "OOM"
                except Exception as exc:  # report a failing case in the table, keep going
                    row.check = "ERROR"
                    row.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                rows.append(row)
                values = asdict(row)
                values["notes"] = " | ".join(row.notes)
                writer.writerow([*facts.values(), *(values[k] for k in names), row.vs_dense,
                                 row.vs_torch])
                f.flush()
                torch.cuda.empty_cache()
            r = rows[-2]
            print(f"  [{i + 1}/{len(cases)}] {dt} N=K={n} B={b} block {blk} density {d}: "
                  f"fwd ours {_fmt(r.ours_ms)} ms, dense {_fmt(r.dense_ms)} ms, "
                  f"torch {_fmt(r.torch_bsr_ms)} ms ({time.perf_counter() - start:.0f}s)",
                  flush=True)
    print()
    _print_table(rows)
    notes = sorted({note for r in rows for note in r.notes})
    if notes:
        print("\ntorch BSR notes (first of each kind):")
        for note in notes[:8]:
            print(f"  {note}")
    print("\nTargets (H100, issue 4):")
    for line in _targets(rows):
        print(f"  {line}")
    print(f"\nCSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
