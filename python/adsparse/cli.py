"""The ``adsparse`` console script.

    adsparse run [options]              the online experiment (default: all four strategies
                                        at density 0.1, block 16x16, kaggle DLRM, synthetic)
    adsparse bench kernels|serving|quality [benchmark options]

Bad options print one line (``adsparse: error: ...``) and exit with status 2, no traceback;
errors from the data or a stale checkpoint print one line and exit with status 1
(``ADSPARSE_DEBUG=1`` re-raises them with the traceback).

``adsparse run`` checks before any work: the environment switches (``ADSPARSE_BACKEND``,
``ADSPARSE_CPU_ISA``), options that do not apply to the chosen data, that ``--out`` and
``--checkpoint-dir`` can be written (and that ``--out`` holds no earlier results), that the
data has a period to score after the warm-up, and that every strategy's pruner accepts the
model at its density and block size. A run in which no period could be scored exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adsparse.checks import check_block_size, check_density

if TYPE_CHECKING:
    from adsparse.online import Experiment

__all__ = ["main"]

BENCHMARKS = ("kernels", "serving", "quality")
_REPO = Path(__file__).resolve().parents[2]
_MAX_SEED = 2**32 - 1  # numpy and torch both take it; larger seeds buy nothing


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


def _block_size(text: str) -> tuple[int, int]:
    try:
        return check_block_size(text, "block size")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (use 16 or 16x16)") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    try:
        return check_density(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {_MAX_SEED}], got {text!r}")
    return value


def _parser() -> _Parser:
    from adsparse.data import DRIFTS
    from adsparse.models import PRESETS
    from adsparse.online import STRATEGY_KNOBS, Experiment, OnlineConfig, strategy_kinds
    from adsparse.online.config import HANDOVERS
    from adsparse.online.experiment import MODEL_KINDS, SYNTHETIC_TABLE_ROWS
    from adsparse.pruning import METHODS

    cfg, exp = OnlineConfig(), Experiment()
    parser = _Parser(prog="adsparse", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the online paradigms over a stream")
    run.add_argument("--data", choices=("synthetic", "criteo"), default="synthetic",
                     help="the stream: the built-in synthetic one or Criteo TSV files "
                          "(default synthetic)")
    run.add_argument("--drift", choices=DRIFTS, default=exp.drift,
                     help="synthetic: regime changes, slow drift only, or a stationary control "
                          f"(default {exp.drift})")
    run.add_argument("--paths", nargs="+", default=[], help="Criteo TSV files (one per period)")
    run.add_argument("--rows-per-period", type=_positive_int, default=None,
                     help="Criteo: fixed rows per period instead of one file per period")
    run.add_argument("--strategies", default=",".join(cfg.strategies),
                     help=f"comma-separated kinds of {', '.join(strategy_kinds())}; each may "
                          "add :r=R, :density=D, :handover=challenger|immediate, :windows=W "
                          f"and :KNOB=V for a knob of {', '.join(STRATEGY_KNOBS)} "
                          f"(default {','.join(cfg.strategies)})")
    run.add_argument("--density", type=_density, default=cfg.density,
                     help=f"kept share of the prunable MLP weights (default {cfg.density})")
    run.add_argument("--block-size", type=_block_size, default=cfg.block_size,
                     help="16 or 16x16 (rows x columns; default "
                          f"{cfg.block_size[0]}x{cfg.block_size[1]})")
    run.add_argument("--preset", choices=sorted(PRESETS), default=exp.preset,
                     help=f"DLRM layer sizes (default {exp.preset})")
    run.add_argument("--model", choices=sorted(MODEL_KINDS), default=exp.model_kind,
                     help="the project's DLRM or TorchRec's, its tables sharded over the "
                          "--nproc processes (needs adsparse[torchrec]; CPU) "
                          f"(default {exp.model_kind})")
    run.add_argument("--pruner", choices=METHODS,
                     default=cfg.pruner,
                     help=f"pruner of prune_once and d2s; ad2s always uses learned "
                          f"(default {cfg.pruner})")
    run.add_argument("--r", type=_positive_int, default=cfg.r,
                     help=f"d2s regeneration interval in periods (default {cfg.r})")
    run.add_argument("--handover", choices=HANDOVERS, default=cfg.handover,
                     help="a regenerated model serves when it beats the serving one on recent "
                          f"windows (challenger) or at once (default {cfg.handover})")
    # None = not given: Criteo refuses them (its periods are its files or --rows-per-period).
    run.add_argument("--periods", type=_positive_int, default=None,
                     help=f"synthetic: periods (default {exp.periods})")
    run.add_argument("--samples-per-period", type=_positive_int, default=None,
                     help=f"synthetic: samples per period (default {exp.samples_per_period})")
    run.add_argument("--batch-size", type=_positive_int, default=exp.batch_size,
                     help=f"mini-batch size (default {exp.batch_size})")
    run.add_argument("--max-table-rows", type=_positive_int, default=exp.max_table_rows,
                     help="rows of each embedding table (synthetic: cap, default "
                          f"{SYNTHETIC_TABLE_ROWS}; criteo: hash size, default 32768)")
    run.add_argument("--prune-steps", type=_positive_int, default=cfg.prune_steps,
                     help=f"optimisation steps of each pruning transition "
                          f"(default {cfg.prune_steps})")
    run.add_argument("--no-sort-units", action="store_true",
                     help="choose block masks on the units as they are, not sorted by "
                          "magnitude first (docs/pruning.md; for comparisons)")
    run.add_argument("--seed", type=_seed, default=cfg.seed,
                     help=f"seed of the stream and the models (default {cfg.seed})")
    run.add_argument("--checkpoint-dir", default=None,
                     help="save at every period end; rerun the same command to resume")
    run.add_argument("--nproc", type=_positive_int, default=1,
                     help="data-parallel processes (default 1)")
    run.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    run.add_argument("--threads", type=_positive_int, default=exp.threads,
                     help="torch threads per process (default 1: fastest on a shared machine)")
    run.add_argument("--out", default=None,
                     help="output folder, new or empty (default runs/<timestamp>[-N])")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench = sub.add_parser(
        "bench", help="run a benchmark script of benchmarks/ (also in an installed wheel)",
        description="Run a benchmark script; its own options follow the name (e.g. "
                    "`adsparse bench kernels --quick`, `adsparse bench kernels -h`).")
    bench.add_argument("which", choices=BENCHMARKS,
                       help="kernels (CPU ops vs MKL and torch.sparse), serving (DLRM "
                            "inference, dense vs sparse) or quality (the online paradigms)")
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="options passed to the benchmark (see `adsparse bench WHICH -h`)")
    return parser


def _check_device(device: str, nproc: int) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"argument --device: invalid device {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("argument --device: CUDA is not available on this machine")
        if nproc > torch.cuda.device_count():
            raise UsageError(f"argument --nproc: {nproc} processes but "
                             f"{torch.cuda.device_count()} GPUs")
    elif dev.type != "cpu":
        raise UsageError(f"argument --device: expected cpu or cuda, got {device!r}")


def _check_environment() -> None:
    """The switches read from the environment, checked before they could fail mid-run."""
    import torch

    from adsparse import ops

    error = ops.backend_error(os.environ.get("ADSPARSE_BACKEND"))
    if error is not None:
        raise UsageError(error)
    try:
        torch.ops.adsparse.selected_cpu_isa()  # the sparse kernels read it on every call
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None


def _check_data_options(args: argparse.Namespace) -> None:
    """Options that do not apply to the chosen data are refused, not silently ignored."""
    if args.data == "criteo":
        if not args.paths:
            raise UsageError("--data criteo needs --paths FILE [FILE ...]")
        missing = [p for p in args.paths if not Path(p).is_file()]
        if missing:
            raise UsageError(f"argument --paths: no such file: {missing[0]}")
        for option, value in (("--periods", args.periods),
                              ("--samples-per-period", args.samples_per_period)):
            if value is not None:
                raise UsageError(f"argument {option}: not for --data criteo (its periods are "
                                 "its files, or --rows-per-period lines; pass fewer --paths "
                                 "for a shorter run)")
    else:
        if args.paths:
            raise UsageError("--paths is only for --data criteo")
        if args.rows_per_period is not None:
            raise UsageError("argument --rows-per-period: only for --data criteo (synthetic "
                             "data uses --samples-per-period)")


def _check_torchrec(args: argparse.Namespace) -> None:
    """``--model torchrec`` needs the extra and the CPU."""
    import importlib.util

    if importlib.util.find_spec("torchrec") is None:
        raise UsageError("argument --model: torchrec is not installed (pip install "
                         "'adsparse[torchrec]'; see the README)")
    if args.device != "cpu":
        raise UsageError("argument --model: torchrec runs on the CPU here (the CPU build of "
                         "fbgemm_gpu)")


def _check_writable(path: Path, option: str) -> None:
    """Fail now, not after the run, if ``path`` cannot become a folder we write files into.

    Creates the missing folders and a probe file, then removes what it created, so a run that
    stops before its end leaves nothing behind.
    """
    missing = []
    existing = path
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"argument {option}: {existing} is not a folder")
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".adsparse-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"argument {option}: cannot write into {path} "
                         f"({err.strerror or err})") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # someone else put a file there meanwhile
                folder.rmdir()


def _output_dir(out: str | None) -> Path:
    """The run's output folder: new or empty, and writable. An explicit ``--out`` that holds
    files is refused (earlier results are never overwritten); the default folder
    ``runs/<timestamp>`` gets a ``-2``, ``-3``, ... suffix if that name is taken."""
    if out is None:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        path = Path(out)
        if path.is_dir() and any(path.iterdir()):
            raise UsageError(f"argument --out: {path} already holds files (earlier results?); "
                             "choose a new or empty folder")
    _check_writable(path, "--out")
    return path


def _preflight(exp: Experiment) -> None:
    """Build what the run builds first (stream, model, each strategy's pruner) and check that
    the data has a period to score after the warm-up, so bad settings fail in one line now
    rather than after the warm-up period."""
    from adsparse.online.config import parse_strategies
    from adsparse.online.experiment import make_components, make_stream

    cfg = exp.cfg
    stream = make_stream(exp)  # Criteo: every file opened and its first bytes read
    warmup = cfg.warmup_periods
    if exp.data == "criteo" and exp.rows_per_period is None and len(exp.paths) <= warmup:
        raise UsageError(f"argument --paths: {len(exp.paths)} file(s) are {len(exp.paths)} "
                         f"period(s), all warm-up ({warmup}); give more files or "
                         "--rows-per-period")
    if exp.data == "criteo" and not stream.num_periods_at_least(warmup + 1):
        raise UsageError(f"argument --rows-per-period: the files hold no more than {warmup} "
                         f"warm-up period(s) of {exp.rows_per_period} lines; nothing to score")
    comps = make_components(stream, exp)
    model = comps.make_model()
    for spec in parse_strategies(cfg.strategies, cfg):
        if spec.kind == "dense":
            continue
        method = "learned" if spec.kind == "ad2s" else cfg.pruner
        try:
            comps.make_pruner(model, spec.density, method, cfg)
        except ValueError as err:
            bn, bk = cfg.block_size
            raise UsageError(f"strategy {spec.name!r} (density {spec.density}, block {bn}x{bk},"
                             f" pruner {method}): {err}") from None


def _run(args: argparse.Namespace) -> int:
    from adsparse.online import (
        Experiment,
        OnlineConfig,
        format_table,
        run_experiment,
        write_report,
    )
    from adsparse.online.report import scored_anything

    _check_environment()
    _check_data_options(args)
    _check_device(args.device, args.nproc)
    cfg = OnlineConfig(density=args.density, block_size=args.block_size, pruner=args.pruner,
                       r=args.r, handover=args.handover, seed=args.seed, device=args.device,
                       prune_steps=args.prune_steps, sort_units=not args.no_sort_units,
                       strategies=[s for s in args.strategies.split(",") if s.strip()])
    if not cfg.strategies:
        raise UsageError("argument --strategies: empty list")
    defaults = Experiment()
    periods = args.periods or defaults.periods
    if args.data == "synthetic" and cfg.warmup_periods >= periods:
        raise UsageError(f"argument --periods: need more than the {cfg.warmup_periods} "
                         "warm-up period(s)")
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(f"argument --strategies: {err}") from None
    out = _output_dir(args.out)
    if args.checkpoint_dir is not None:
        _check_writable(Path(args.checkpoint_dir), "--checkpoint-dir")
    if args.model == "torchrec":
        _check_torchrec(args)
    exp = Experiment(cfg=cfg, data=args.data, drift=args.drift, paths=list(args.paths),
                     rows_per_period=args.rows_per_period, preset=args.preset,
                     periods=periods,
                     samples_per_period=args.samples_per_period or defaults.samples_per_period,
                     batch_size=args.batch_size, max_table_rows=args.max_table_rows,
                     checkpoint_dir=args.checkpoint_dir,
                     nproc=args.nproc, threads=args.threads, progress=not args.no_progress,
                     model_kind=args.model)
    _preflight(exp)
    start = time.perf_counter()
    results = run_experiment(exp)
    write_report(results, out)
    print(format_table(results))
    malformed = results.get("experiment", {}).get("malformed_rows")
    if malformed is not None:
        print(f"\nmalformed rows skipped: {malformed}")
    print(f"\nwall time {time.perf_counter() - start:.1f} s; wrote results.json, periods.csv, "
          f"ne_over_time.png, layer_density.png to {out}")
    if not scored_anything(results):
        print("adsparse: error: no period could be scored (every period after the warm-up is "
              "empty or has a single label class); the numbers above mean nothing",
              file=sys.stderr)
        return 1
    return 0


def _benchmark_dir() -> Path | None:
    """Where the benchmark scripts are: the checkout's benchmarks/, else the installed copy.

    In a checkout (editable install, or ``python/`` on the path) the scripts are the files in
    benchmarks/ themselves. A wheel ships that same folder as the package
    ``adsparse.benchmarks`` (setup.py maps it), so an installed ``adsparse`` finds them there.
    """
    checkout = _REPO / "benchmarks"
    if checkout.is_dir():
        return checkout
    try:
        installed = importlib.import_module("adsparse.benchmarks")
    except ImportError:
        return None
    return Path(next(iter(installed.__path__)))


def _load_benchmark(which: str):
    folder = _benchmark_dir()
    if folder is None:
        raise UsageError(f"benchmark {which!r} not found: no benchmarks/ folder next to the "
                         "package and no installed adsparse.benchmarks")
    path = folder / f"bench_{which}.py"
    if not path.is_file():
        raise UsageError(f"benchmark {which!r} not found at {path}")
    # Loaded by path so `adsparse bench` runs the very file in benchmarks/, not a copy.
    spec = importlib.util.spec_from_file_location(f"adsparse_bench_{which}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # multiprocessing (spawn) must find it again by name
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise UsageError(f"{path} has no main(argv)")
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adsparse`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        if args.command == "bench":
            module = _load_benchmark(args.which)
            status = module.main(list(args.args))
            return int(status or 0)
        return _run(args)
    except UsageError as err:
        print(f"adsparse: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adsparse: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as err:
        # Errors the data or the settings raise (a corrupt file, a stale checkpoint): one line.
        if os.environ.get("ADSPARSE_DEBUG"):
            raise
        print(f"adsparse: error: {err} (ADSPARSE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
