"""One experiment end to end: build the stream and the components, run (data parallel or not)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adsparse.online.components import Components, default_components
from adsparse.online.config import OnlineConfig
from adsparse.online.distributed import DistContext, spawn
from adsparse.online.trainer import OnlineTrainer

__all__ = ["MODEL_KINDS", "Experiment", "data_fingerprint", "make_components", "make_stream",
           "run_experiment"]

# Rows of each synthetic table. 64: every table then exists whole from the start and its IDs
# recur often enough that the dense model gets within ~5% of the stream's Bayes NE by the end of
# each regime (at 2000 rows it stayed 13-24% above it; benchmarks/RESULTS.md, "Quality").
SYNTHETIC_TABLE_ROWS = 64


@dataclass
class Experiment:
    """What ``adsparse run`` runs. Picklable, so every rank can rebuild the same run from it."""

    cfg: OnlineConfig = field(default_factory=OnlineConfig)
    data: str = "synthetic"  # or "criteo"
    # synthetic only: "rewire" (each regime change moves the interactions that matter to other
    # fields: a stale mask then costs, see docs/online.md), "regimes", "slow" or "none".
    drift: str = "rewire"
    paths: list[str] = field(default_factory=list)
    rows_per_period: int | None = None  # criteo: None = one file per period
    preset: str = "kaggle"
    periods: int = 9
    # 192 steps of 1024 samples a period: with 16384 samples of 256 the dense model never came
    # near the Bayes NE, so comparisons measured learning speed, not sparsity; with 128 steps it
    # ended each regime of the default stream 6-8% above it, with 192 about 4-5%.
    samples_per_period: int = 196608
    batch_size: int = 1024
    # Rows of each embedding table: synthetic caps its Criteo-like sizes at this (default
    # 64, see SYNTHETIC_TABLE_ROWS); criteo hashes into this many (default: the
    # stream's own, 32768).
    max_table_rows: int | None = None
    model: dict[str, Any] | None = None  # DLRM(**model) instead of the preset (tests)
    model_kind: str = "dlrm"  # a key of MODEL_KINDS: the project's DLRM or TorchRec's
    checkpoint_dir: str | None = None
    nproc: int = 1
    # Intra-op threads per process. 1 by default: on a 2-core machine shared with other jobs,
    # 2 threads made a kaggle dense step 477 ms instead of 17 ms (busy-waiting threads
    # preempted by the other jobs); on an idle machine 1 thread costs less than 2x.
    threads: int | None = 1
    progress: bool = True


def make_stream(exp: Experiment) -> Any:
    """The experiment's stream (synthetic with ``exp.cfg.seed``, or Criteo files)."""
    if exp.data == "synthetic":
        from adsparse.data import CRITEO_LIKE_SIZES, SyntheticCTRStream

        cap = exp.max_table_rows or SYNTHETIC_TABLE_ROWS
        sizes = [min(n, cap) for n in CRITEO_LIKE_SIZES]
        return SyntheticCTRStream(num_periods=exp.periods,
                                  samples_per_period=exp.samples_per_period,
                                  seed=exp.cfg.seed, batch_size=exp.batch_size,
                                  embedding_sizes=sizes, drift=exp.drift)
    if exp.data == "criteo":
        from adsparse.data import CriteoStream

        extra = {} if exp.max_table_rows is None else {"hash_sizes": exp.max_table_rows}
        return CriteoStream(exp.paths, rows_per_period=exp.rows_per_period,
                            batch_size=exp.batch_size, **extra)
    raise ValueError(f"unknown data {exp.data!r} (choose synthetic or criteo)")


def _dlrm_components(stream: Any, exp: Experiment, ctx: DistContext) -> Components:
    return default_components(stream.num_dense, list(stream.embedding_sizes), exp.preset,
                              exp.cfg.seed, exp.model)


def _torchrec_components(stream: Any, exp: Experiment, ctx: DistContext) -> Components:
    from adsparse.online.torchrec import preset_torchrec_components

    return preset_torchrec_components(stream.num_dense, list(stream.embedding_sizes),
                                      exp.preset, exp.cfg.seed, exp.cfg.lr, ctx,
                                      exp.cfg.device, exp.model)


#: The model kinds ``adsparse run --model`` offers: each builds the run's components.
MODEL_KINDS = {"dlrm": _dlrm_components, "torchrec": _torchrec_components}


def make_components(stream: Any, exp: Experiment, ctx: DistContext | None = None) -> Components:
    """The components of ``exp.model_kind`` for ``stream`` (``ctx``: this process's rank)."""
    if exp.model_kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {exp.model_kind!r}; choose from {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[exp.model_kind](stream, exp, ctx or DistContext())


def data_fingerprint(exp: Experiment) -> dict[str, Any]:
    """Every option of ``exp`` besides the config that changes the data or the model.

    Criteo files are identified by name and size (hashing gigabytes at every resume would cost
    minutes); a file replaced by one of the same size is the user's to notice.
    """
    files = [[Path(p).name, Path(p).stat().st_size if Path(p).exists() else None]
             for p in exp.paths]
    return {"data": exp.data, "drift": exp.drift, "paths": files,
            "rows_per_period": exp.rows_per_period, "preset": exp.preset, "model": exp.model,
            "periods": exp.periods if exp.data == "synthetic" else None,
            "samples_per_period": exp.samples_per_period, "batch_size": exp.batch_size,
            "max_table_rows": exp.max_table_rows,
            # Only when not the default, so checkpoints written before the key existed resume.
            **({} if exp.model_kind == "dlrm" else {"model_kind": exp.model_kind})}


def _rank_main(ctx: DistContext, exp: Experiment, result_path: str | None) -> dict[str, Any]:
    if exp.threads is not None:
        torch.set_num_threads(exp.threads)
    elif ctx.world > 1:
        # Share the cores: N ranks each with all threads would oversubscribe the machine.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world))
    stream = make_stream(exp)
    comps = make_components(stream, exp, ctx)
    trainer = OnlineTrainer(stream, exp.cfg, comps, ctx, exp.checkpoint_dir,
                            progress=exp.progress, data_fingerprint=data_fingerprint(exp))
    results = trainer.run()
    results["experiment"] = {"data": exp.data, "drift": exp.drift, "preset": exp.preset,
                             "periods": stream.num_periods,
                             "samples_per_period": exp.samples_per_period,
                             "batch_size": exp.batch_size, "nproc": exp.nproc,
                             "model": exp.model_kind,
                             "stream": repr(stream)}
    if hasattr(stream, "malformed_rows"):
        results["experiment"]["malformed_rows"] = int(stream.malformed_rows)
    if result_path is not None and ctx.is_main:
        # JSON, not pickle: reading the results back must not be able to run code.
        Path(result_path).write_text(json.dumps(results))
    return results


def run_experiment(exp: Experiment) -> dict[str, Any]:
    """Run ``exp`` in this process (``nproc == 1``) or in ``nproc`` ranks; rank 0's results."""
    exp.cfg.validate()
    if exp.nproc == 1:
        return _rank_main(DistContext(), exp, None)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        spawn(_rank_main, exp.nproc, (exp, path), device=exp.cfg.device)
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)
