"""The stream loop: every strategy sees the same batches in the same order, period by period.

For each mini-batch: the dense model and every serving model make their predictions and then
train on it (progressive validation, see ``strategies``); the predictions are gathered across
ranks and scored per period (and, for ad2s, per window). At each period end the strategies may
regenerate their sparse models, the period's metrics are recorded, and a checkpoint is written.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from adsparse.data.base import Batch, Stream
from adsparse.metrics import relative_ne
from adsparse.online.checkpoint import (
    CheckpointError,
    CheckpointLock,
    load_checkpoint,
    require_keys,
    save_checkpoint,
)
from adsparse.online.components import Components, MetricsLike
from adsparse.online.config import OnlineConfig, parse_strategies
from adsparse.online.distributed import DistContext
from adsparse.online.regeneration import mlp_densities, serving_density
from adsparse.online.strategies import STRATEGIES, DenseTrack, Strategy, make_strategy

__all__ = ["OnlineTrainer"]

BatchHook = Callable[[int, int, Batch, dict[str, torch.Tensor]], None]
PeriodHook = Callable[[int], None]
_STATE_KEYS = ("fingerprint", "next_period", "dense", "strategies", "buffer", "history",
               "totals", "rng", "wall_s")


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
        on_period_end: called with the period after its checkpoint is written (tests use it to
            stop a run where a crash would).
        progress: show a tqdm bar per period (rank 0 only).
        data_fingerprint: the options that decide the data (sizes, files, preset...): a
            checkpoint written with other values is refused, naming them.
    """

    def __init__(self, stream: Stream, cfg: OnlineConfig, comps: Components,
                 ctx: DistContext | None = None, checkpoint_dir: str | None = None,
                 on_batch: BatchHook | None = None, progress: bool = True,
                 on_period_end: PeriodHook | None = None,
                 data_fingerprint: dict[str, Any] | None = None):
        cfg.validate()
        self.stream, self.cfg, self.comps = stream, cfg, comps
        self.ctx = ctx or DistContext()
        self.checkpoint_dir = checkpoint_dir
        self.on_batch, self.on_period_end = on_batch, on_period_end
        self.data_fingerprint = dict(data_fingerprint or {})
        self.progress = progress and self.ctx.is_main
        specs = parse_strategies(cfg.strategies, cfg)
        references = [k for k, cls in STRATEGIES.items() if cls.reference]
        if not any(s.kind in references for s in specs):
            specs = parse_strategies(references[:1], cfg) + specs
        self.dense_name = next(s.name for s in specs if s.kind in references)
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
        return {**{f"config.{k}": v for k, v in cfg.items()}, **self.data_fingerprint,
                "num_periods": self.stream.num_periods, "world": self.ctx.world}

    def state_dict(self) -> dict[str, Any]:
        """The run's state as tensors and plain data (see ``checkpoint``)."""
        return {
            "fingerprint": self._fingerprint(), "next_period": self.next_period,
            "dense": self.dense.state_dict(),
            "strategies": {s.name: s.state_dict() for s in self.strategies},
            "buffer": [tuple(b) for b in self.buffer], "history": self.history,
            "totals": {k: m.state_dict() for k, m in self.totals.items()},
            "rng": torch.get_rng_state(), "wall_s": self.wall_s,
            # The stream's own counters (Criteo's malformed rows per period), so a resumed run
            # reports the same totals as an uninterrupted one.
            "stream": self.stream.state_dict() if hasattr(self.stream, "state_dict") else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_keys(state, _STATE_KEYS, "")
        saved, now = state["fingerprint"], self._fingerprint()
        if saved != now:
            keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys)
            raise CheckpointError("the checkpoint was written by a run with different settings "
                                  f"({diffs}); use another --checkpoint-dir")
        require_keys(state["strategies"], tuple(s.name for s in self.strategies), "strategy ")
        if state.get("stream") and hasattr(self.stream, "load_state_dict"):
            self.stream.load_state_dict(state["stream"])
        self.next_period = state["next_period"]
        self.dense.load_state_dict(state["dense"])
        for s in self.strategies:
            s.load_state_dict(state["strategies"][s.name])
        self.buffer.extend(Batch(*b) for b in state["buffer"])
        self.history = state["history"]
        for k, m in self.totals.items():
            m.load_state_dict(state["totals"][k])
        torch.set_rng_state(state["rng"])
        self.wall_s = state["wall_s"]

    def _maybe_resume(self) -> None:
        if self.checkpoint_dir is None:
            return
        state = load_checkpoint(self.checkpoint_dir)
        if state is not None:
            try:
                self.load_state_dict(state)
            except (KeyError, TypeError, RuntimeError) as err:
                raise CheckpointError(f"{self.checkpoint_dir}: the checkpoint does not fit this "
                                      f"run ({type(err).__name__}: {err}); use another "
                                      "--checkpoint-dir") from None

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
            outputs = [s.step(local, rows, dense_logits) for s in self.strategies]
            # One gather for every model's predictions (served first, then any challenger).
            flat = ctx.gather_rows(torch.sigmoid(torch.stack([x for o in outputs for x in o])))
            flat, labels = flat.cpu(), batch.labels.cpu()
            per_strategy, start = {}, 0
            for s, o in zip(self.strategies, outputs):
                per_strategy[s.name] = list(flat[start:start + len(o)])
                start += len(o)
            by_name = {name: preds[0] for name, preds in per_strategy.items()}
            dense_preds = by_name[self.dense_name]
            for s in self.strategies:
                metrics[s.name].update(labels, by_name[s.name])
                if scored:
                    self.totals[s.name].update(labels, by_name[s.name])
            self.buffer.append(Batch(batch.dense.cpu(), batch.sparse.cpu(), labels))
            for s in self.strategies:
                s.after_batch(p, i, per_strategy[s.name], dense_preds, labels, self.dense,
                              self.buffer)
            if self.on_batch is not None:
                self.on_batch(p, i, batch, by_name)
        for s in self.strategies:
            row = {"period": p, "scored": scored, **metrics[s.name].compute(),
                   "serving_density": (1.0 if s.serving is None
                                       else serving_density(s.serving.model))}
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
            parts.append(f"{s.name} {100 * relative_ne(ne, ref):+.2f}%")
        msg = f"period {p}: " + " | ".join(parts)
        if self.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def run(self) -> dict[str, Any]:
        """Run (or resume) to the end of the stream; returns the raw results (see ``report``)."""
        lock = (CheckpointLock(self.checkpoint_dir)
                if self.checkpoint_dir is not None and self.ctx.is_main
                else contextlib.nullcontext())
        with lock:
            self._maybe_resume()
            for p in range(self.next_period, self.stream.num_periods):
                t = time.perf_counter()
                self._run_period(p)
                self.next_period = p + 1
                self.wall_s += time.perf_counter() - t
                self._log_period(p)
                if self.checkpoint_dir is not None:
                    state = self.state_dict()  # on every rank: sharded tables are gathered
                    if self.ctx.is_main:
                        save_checkpoint(self.checkpoint_dir, state)
                    self.ctx.barrier()
                if self.on_period_end is not None:
                    self.on_period_end(p)
        return self.results()

    # ------------------------------------------------------------------ results
    def results(self) -> dict[str, Any]:
        """Per strategy: per-period metrics, whole-stream metrics, regenerations and timings."""
        out: dict[str, Any] = {"config": self.cfg.to_dict(), "num_periods": self.stream.num_periods,
                               "world": self.ctx.world, "wall_s": self.wall_s, "strategies": {}}
        batches = self._batches_per_period()
        for s in self.strategies:
            model = None if s.serving is None else s.serving.model
            layers = {} if model is None else mlp_densities(model)
            extra = s.report()
            # A regeneration's cost in periods of dense training (the dense model's measured
            # seconds per step times the batches of a period).
            costs = [g["seconds"] / (g["dense_s_per_step"] * batches)
                     for g in extra["regenerations"] if batches and g["dense_s_per_step"] > 0]
            out["strategies"][s.name] = {
                "kind": s.spec.kind, "density": s.spec.density, "r": s.spec.r,
                "handover": s.spec.handover,
                "periods": self.history[s.name], "stream": self.totals[s.name].compute(),
                **extra,
                "regeneration_cost_periods": sum(costs) / len(costs) if costs else None,
                "serving_density": 1.0 if model is None else serving_density(model),
                "layer_densities": layers,
                # Its own steps and transitions plus the dense training it needs.
                "train_time_s": s.time_s + s.dense_seconds(self.dense),
            }
        return out
