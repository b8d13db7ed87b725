#!/usr/bin/env bash
# Everything issue 4 asks of a GPU machine, in one call: build the C++ extension with the
# machine's own torch, run the CUDA tests, run the GPU benchmark, print a short table last.
#
# For a fresh machine that has torch and triton but no network: nothing is installed, the
# package is used in place (PYTHONPATH). Logs and the benchmark CSV go to $OUT when it is set
# (the device tool's result folder), else to runs/gpu_check/. The whole run stays under
# GPU_CHECK_BUDGET_S seconds (default 470, i.e. under 8 minutes): the benchmark gets what the
# build and the tests leave, and stops starting new shapes when that runs out.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter (default python3)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
LOG_DIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
T0=$(date +%s)
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
stage() { echo; echo "== $1 (t=$(($(date +%s) - T0))s)"; }

stage "machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
if ! "$PY" - <<'EOF' 2>&1 | tee "$LOG_DIR/env.txt"; then
import sys, torch, triton
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | triton {triton.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
print(f"device: {torch.cuda.get_device_name()} | capability {torch.cuda.get_device_capability()}")
EOF
    echo "gpu_check: no usable CUDA device; stopping."
    exit 1
fi

stage "build (setup.py build_ext --inplace)"
if ! timeout 240 "$PY" setup.py -q build_ext --inplace >"$LOG_DIR/build.log" 2>&1; then
    tail -n 40 "$LOG_DIR/build.log"
    echo "gpu_check: the C++ extension did not build (log: $LOG_DIR/build.log); stopping."
    exit 1
fi
if ! "$PY" -c "import adsparse, adsparse_kernels" >>"$LOG_DIR/build.log" 2>&1; then
    tail -n 20 "$LOG_DIR/build.log"
    echo "gpu_check: built, but adsparse does not import; stopping."
    exit 1
fi
echo "built; log: $LOG_DIR/build.log"

stage "CUDA tests (tests/test_cuda.py, one config per kernel)"
TEST_LIMIT=$(( $(left) - 150 ))
if [ "$TEST_LIMIT" -gt 240 ]; then TEST_LIMIT=240; fi
if [ "$TEST_LIMIT" -lt 60 ]; then TEST_LIMIT=60; fi
ADSPARSE_TRITON_AUTOTUNE=0 timeout "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py >"$LOG_DIR/tests.log" 2>&1
TEST_RC=$?
grep -E "^(FAILED|ERROR)" "$LOG_DIR/tests.log" | head -n 20
TEST_SUMMARY="$(tail -n 1 "$LOG_DIR/tests.log")"
if [ "$TEST_RC" -eq 124 ]; then TEST_SUMMARY="timed out after ${TEST_LIMIT}s: $TEST_SUMMARY"; fi
echo "tests: $TEST_SUMMARY (log: $LOG_DIR/tests.log)"

stage "benchmark (benchmarks/bench_gpu.py)"
BENCH_BUDGET=$(( $(left) - 75 ))
if [ "$BENCH_BUDGET" -lt 30 ]; then BENCH_BUDGET=30; fi
timeout $((BENCH_BUDGET + 60)) "$PY" benchmarks/bench_gpu.py --out "$LOG_DIR/bench_gpu.csv" \
    --budget-s "$BENCH_BUDGET" >"$LOG_DIR/bench.log" 2>&1
BENCH_RC=$?
grep -E "^  \[" "$LOG_DIR/bench.log" | tail -n 3
echo "benchmark exit $BENCH_RC; full table: $LOG_DIR/bench.log"

stage "summary"
"$PY" - "$LOG_DIR/bench_gpu.csv" <<'EOF'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    rows = []
f = lambda v: "-" if v in ("", "nan", None) else f"{float(v):.2f}"
by = {(r["dtype"], r["n"], r["batch"], r["block"], r["mode"]): r for r in rows
      if float(r["density"]) == 0.1}
print("density 0.1; speed-ups of ours (x = other ms / ours ms); all rows in the CSV")
print(f"{'dtype':5} {'N=K':>5} {'B':>5} {'blk':>3} | {'fwd ms':>7} {'xcuBLAS':>7} {'xtorch':>7} "
      f"| {'f+b ms':>7} {'xcuBLAS':>7} {'xtorch':>7} | check")
for key in sorted({k[:4] for k in by}, key=lambda k: (k[0], -int(k[1]), -int(k[2]), -int(k[3]))):
    fw, fb = by.get(key + ("fwd",), {}), by.get(key + ("fwd+bwd",), {})
    cells = [f(r.get(c)) for r in (fw, fb) for c in ("ours_ms", "vs_dense", "vs_torch")]
    checks = ",".join(sorted({r.get("check", "-") for r in (fw, fb)}))
    print(f"{key[0]:5} {key[1]:>5} {key[2]:>5} {key[3]:>3} | {cells[0]:>7} {cells[1]:>7} "
          f"{cells[2]:>7} | {cells[3]:>7} {cells[4]:>7} {cells[5]:>7} | {checks}")
print(f"({len(rows)} rows measured in all)")
EOF
sed -n '/^Targets/,/^CSV/p' "$LOG_DIR/bench.log" | grep -v "^CSV"
echo "CUDA tests: $TEST_SUMMARY"
echo "total: $(($(date +%s) - T0))s"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
