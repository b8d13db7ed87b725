"""The stream loop: every strategy sees the same batches in the same order, period by period.

For each mini-batch: the dense model and every serving model make their predictions and then
train on it (progressive validation, see ``strategies``); the predictions are gathered across
ranks and scored per period (and, for ad2s, per window). At each period end the strategies may
regenerate their sparse models, the period's metrics are recorded, and a checkpoint is written.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from adsparse.data.base import Batch, Stream
from adsparse.online.checkpoint import load_checkpoint, save_checkpoint
from adsparse.online.components import Components, MetricsLike
from adsparse.online.config import OnlineConfig, parse_strategies
from adsparse.online.distributed import DistContext
from adsparse.online.strategies import (
    DenseTrack,
    Strategy,
    make_strategy,
    mlp_densities,
    serving_density,
)

__all__ = ["EXIT_AFTER_ENV", "OnlineTrainer"]

# Testing hook: exit (as if killed) right after the checkpoint of this period is written.
EXIT_AFTER_ENV = "ADSPARSE_EXIT_AFTER_PERIOD"
EXIT_AFTER_CODE = 75

BatchHook = Callable[[int, int, Batch, dict[str, torch.Tensor]], None]


class OnlineTrainer:
    """Run the configured strategies over ``stream`` and collect their metrics.

    Args:
        stream: any :class:`adsparse.data.base.Stream`.
        cfg: the run's knobs; ``cfg.strategies`` lists the strategies (``dense`` is always
            added: it is the reference every relative number is taken against).
        comps: model, pruner and metrics factories.
        ctx: this process's rank (data parallel); the default is a single process.
        checkpoint_dir: where to save after each period, and resume from if a checkpoint exists.
        on_batch: called with ``(period, index, batch, {name: predictions})`` after each batch.
        progress: show a tqdm bar per period (rank 0 only).
    """

    def __init__(self, stream: Stream, cfg: OnlineConfig, comps: Components,
                 ctx: DistContext | None = None, checkpoint_dir: str | None = None,
                 on_batch: BatchHook | None = None, progress: bool = True):
        cfg.validate()
        self.stream, self.cfg, self.comps = stream, cfg, comps
        self.ctx = ctx or DistContext()
        self.checkpoint_dir = checkpoint_dir
        self.on_batch = on_batch
        self.progress = progress and self.ctx.is_main
        specs = parse_strategies(cfg.strategies, cfg)
        if not any(s.kind == "dense" for s in specs):
            specs = parse_strategies(["dense"], cfg) + specs
        self.dense_name = next(s.name for s in specs if s.kind == "dense")
        self.dense = DenseTrack(comps, cfg, self.ctx)
        self.strategies: list[Strategy] = [make_strategy(s, cfg, comps, self.ctx) for s in specs]
        self.buffer: deque[Batch] = deque(maxlen=cfg.buffer_batches)
        self.history: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.strategies}
        self.totals: dict[str, MetricsLike] = {s.name: comps.make_metrics()
                                               for s in self.strategies}
        self.next_period = 0
        self.wall_s = 0.0

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg.to_dict()
        cfg.pop("device")  # a run may resume on another device
        return {"config": cfg, "num_periods": self.stream.num_periods, "world": self.ctx.world}

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fingerprint(), "next_period": self.next_period,
            "dense": self.dense.state_dict(),
            "strategies": {s.name: s.state_dict() for s in self.strategies},
            "buffer": list(self.buffer), "history": self.history, "totals": self.totals,
            "rng": torch.get_rng_state(), "wall_s": self.wall_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("the checkpoint was written by a run with different settings "
                             f"({state['fingerprint']}); use another --checkpoint-dir")
        self.next_period = state["next_period"]
        self.dense.load_state_dict(state["dense"])
        for s in self.strategies:
            s.load_state_dict(state["strategies"][s.name])
        self.buffer.extend(state["buffer"])
        self.history, self.totals = state["history"], state["totals"]
        torch.set_rng_state(state["rng"])
        self.wall_s = state["wall_s"]

    def _maybe_resume(self) -> None:
        if self.checkpoint_dir is None:
            return
        state = load_checkpoint(self.checkpoint_dir)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ the loop
    def _batches_per_period(self) -> int | None:
        samples = getattr(self.stream, "samples_per_period", None)
        size = getattr(self.stream, "batch_size", None)
        if isinstance(samples, int) and isinstance(size, int) and size > 0:
            return -(-samples // size)
        return None

    def _run_period(self, p: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        scored = p >= cfg.warmup_periods
        metrics = {s.name: self.comps.make_metrics() for s in self.strategies}
        batches = self.stream.period(p)
        if self.progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=self._batches_per_period(), desc=f"period {p}",
                           unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        for i, batch in enumerate(batches):
            batch = Batch(batch.dense.to(cfg.device), batch.sparse.to(cfg.device),
                          batch.labels.to(cfg.device).float())
            local, rows = ctx.share(batch), batch.labels.shape[0]
            dense_logits = self.dense.step(local, rows)
            logits = [s.step(local, rows, dense_logits) for s in self.strategies]
            preds = ctx.gather_rows(torch.sigmoid(torch.stack(logits))).cpu()
            labels = batch.labels.cpu()
            by_name = {s.name: preds[j] for j, s in enumerate(self.strategies)}
            dense_preds = by_name[self.dense_name]
            for s in self.strategies:
                metrics[s.name].update(labels, by_name[s.name])
                if scored:
                    self.totals[s.name].update(labels, by_name[s.name])
            self.buffer.append(Batch(batch.dense.cpu(), batch.sparse.cpu(), labels))
            for s in self.strategies:
                s.after_batch(p, i, by_name[s.name], dense_preds, labels, self.dense, self.buffer)
            if self.on_batch is not None:
                self.on_batch(p, i, batch, by_name)
        for s in self.strategies:
            row = {"period": p, "scored": scored, **metrics[s.name].compute(),
                   "serving_density": 1.0 if s.serving is None else serving_density(s.serving)}
            self.history[s.name].append(row)
        for s in self.strategies:
            s.end_period(p, self.dense, self.buffer)

    def _log_period(self, p: int) -> None:
        if not self.ctx.is_main:
            return
        ref = self.history[self.dense_name][-1]["ne"]
        parts = [f"dense NE {ref:.4f}"]
        for s in self.strategies:
            if s.name == self.dense_name:
                continue
            ne = self.history[s.name][-1]["ne"]
            parts.append(f"{s.name} {100 * (ne - ref) / ref:+.2f}%")
        msg = f"period {p}: " + " | ".join(parts)
        if self.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def run(self) -> dict[str, Any]:
        """Run (or resume) to the end of the stream; returns the raw results (see ``report``)."""
        self._maybe_resume()
        exit_after = os.environ.get(EXIT_AFTER_ENV)
        for p in range(self.next_period, self.stream.num_periods):
            t = time.perf_counter()
            self._run_period(p)
            self.next_period = p + 1
            self.wall_s += time.perf_counter() - t
            self._log_period(p)
            if self.checkpoint_dir is not None:
                if self.ctx.is_main:
                    save_checkpoint(self.checkpoint_dir, self.state_dict())
                self.ctx.barrier()
            if exit_after is not None and int(exit_after) == p:
                os._exit(EXIT_AFTER_CODE)
        return self.results()

    # ------------------------------------------------------------------ results
    def results(self) -> dict[str, Any]:
        """Per strategy: per-period metrics, whole-stream metrics, regenerations and timings."""
        out: dict[str, Any] = {"config": self.cfg.to_dict(), "num_periods": self.stream.num_periods,
                               "world": self.ctx.world, "wall_s": self.wall_s, "strategies": {}}
        for s in self.strategies:
            model = s.serving
            layers = {} if model is None else mlp_densities(model)
            # Time the paradigm costs: its own steps and transitions plus the dense model it
            # needs (prune_once only needs it up to its one transition).
            dense_s = self.dense.time_s
            if s.spec.kind == "prune_once" and s.regenerations:
                dense_s = s.regenerations[0]["dense_time_s"]
            own = s.time_s + dense_s
            out["strategies"][s.name] = {
                "kind": s.spec.kind, "density": s.spec.density, "r": s.spec.r,
                "periods": self.history[s.name], "stream": self.totals[s.name].compute(),
                "regenerations": s.regenerations,
                "windows": getattr(s, "windows", []),
                "serving_density": 1.0 if model is None else serving_density(model),
                "layer_densities": layers, "train_time_s": own,
            }
        return out
