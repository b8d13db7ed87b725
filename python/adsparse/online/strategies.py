"""The paradigms: dense, prune_once, d2s and ad2s (docs/online.md).

A run owns one :class:`DenseTrack` (the dense model trained on everything) and one
:class:`Strategy` per paradigm. Sharing the dense model is exact, not an approximation: d2s,
ad2s and the dense reference would each train the same deterministic model on the same batches,
so training it once gives the same numbers at a fraction of the cost.

Progressive validation: the logits a model returns from :func:`train_step` come from the forward
pass that precedes that batch's update, so they are predictions made before the model trained on
the batch. Reusing that forward for evaluation halves the compute and changes nothing.

Champion/challenger: with ``handover="challenger"`` a regenerated sparse model does not serve at
once. It trains on the stream beside the serving model, both are scored on the same batches, and
it takes over only when its log-loss over the last ``handover_windows`` windows (the strategy's
``windows=`` option, else the config's) is lower than the
serving model's by ``handover_margin`` (relative); a challenger that has not won after
``challenger_patience`` windows is dropped. Serving therefore never switches to a model that was
worse on the recent windows. The first sparse model (after the warm-up) serves at once: before it
the dense model serves, and the point of the run is to serve sparse.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adsparse.data.base import Batch
from adsparse.metrics import relative_ne
from adsparse.online.components import Components
from adsparse.online.config import OnlineConfig, StrategySpec
from adsparse.online.distributed import DistContext, mask_digest
from adsparse.online.regeneration import (
    SparseModel,
    block_masks,
    magnitude_topk,
    make_optimizer,
    mlp_densities,
    serving_density,
    transition,
)

__all__ = ["STRATEGIES", "DenseTrack", "Strategy", "make_strategy", "train_step"]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, local: Batch, global_rows: int,
               ctx: DistContext) -> torch.Tensor:
    """One step on this rank's rows; returns the logits of the forward before the update."""
    logits = model(local.dense, local.sparse)
    # Sum over local rows / global rows: the all-reduced gradient equals the 1-process mean.
    loss = F.binary_cross_entropy_with_logits(logits, local.labels, reduction="sum") / global_rows
    opt.zero_grad(set_to_none=True)
    loss.backward()
    ctx.all_reduce_grads(model)
    opt.step()
    return logits.detach()


class DenseTrack:
    """The dense model that trains on every batch (the reference and the source of d2s/ad2s)."""

    def __init__(self, comps: Components, cfg: OnlineConfig, ctx: DistContext):
        model = comps.make_model().to(cfg.device)
        self.placement = comps.placement
        self.model, self.opt = comps.placement.distribute(model, make_optimizer(model, cfg.lr))
        self.ctx = ctx
        self.time_s = 0.0
        self.steps = 0

    def step(self, local: Batch, global_rows: int) -> torch.Tensor:
        t = time.perf_counter()
        logits = train_step(self.model, self.opt, local, global_rows, self.ctx)
        self.time_s += time.perf_counter() - t
        self.steps += 1
        return logits

    def seconds_per_step(self) -> float:
        return self.time_s / max(1, self.steps)

    def state_dict(self) -> dict:
        """Plain data (collective: a sharded model is gathered)."""
        model, opt = self.placement.gather(self.model, self.opt)
        return {"model": model.state_dict(), "opt": opt.state_dict(),
                "time_s": self.time_s, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        model, opt = self.placement.gather(self.model, self.opt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        self.model, self.opt = self.placement.distribute(model, opt)
        self.time_s, self.steps = state["time_s"], state["steps"]


class Strategy:
    """Base: serves the dense model until a sparse model exists, then serves and trains that.

    Subclasses decide *when* to regenerate (:meth:`end_period`, :meth:`end_window`);
    :meth:`regenerate` is the one way a sparse model is made (see ``regeneration.transition``).
    It runs on rank 0 and is broadcast, and every rank checks that its masks agree.
    """

    #: whether a regenerated model competes as a challenger (if the config asks for it)
    regenerates = True
    #: the reference every relative number is taken against (one per run)
    reference = False

    def __init__(self, spec: StrategySpec, cfg: OnlineConfig, comps: Components,
                 ctx: DistContext):
        self.spec, self.cfg, self.comps, self.ctx = spec, spec.config(cfg), comps, ctx
        self.name = spec.name
        self.method = cfg.pruner
        self.serving: SparseModel | None = None
        self.challenger: SparseModel | None = None
        self.pruner_state: dict | None = None
        self.reference_mask: dict[str, torch.Tensor] | None = None
        self.regenerations: list[dict[str, Any]] = []
        self.handovers: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.duel: list[list[float]] = []  # per window: [serving, challenger] log-loss sums
        self.time_s = 0.0
        self.win = {k: comps.make_metrics() for k in ("serving", "dense", "challenger")}
        self.win_batches = 0

    # ------------------------------------------------------------------ per batch
    def step(self, local: Batch, global_rows: int, dense_logits: torch.Tensor
             ) -> list[torch.Tensor]:
        """Logits of the served model (first) and of a challenger in flight, then train both."""
        if self.serving is None:
            return [dense_logits]
        t = time.perf_counter()
        out = [train_step(self.serving.model, self.serving.opt, local, global_rows, self.ctx)]
        if self.challenger is not None:
            out.append(train_step(self.challenger.model, self.challenger.opt, local,
                                  global_rows, self.ctx))
        self.time_s += time.perf_counter() - t
        return out

    def after_batch(self, period: int, index: int, preds: list[torch.Tensor],
                    dense_preds: torch.Tensor, labels: torch.Tensor, dense: DenseTrack,
                    buffer: deque[Batch]) -> None:
        """Accumulate the window's metrics (served, dense, challenger); act at window ends."""
        if self.serving is None:
            return
        self.win["serving"].update(labels, preds[0])
        self.win["dense"].update(labels, dense_preds)
        if len(preds) > 1:
            self.win["challenger"].update(labels, preds[1])
        self.win_batches += 1
        if self.win_batches < self.cfg.window_batches:
            return
        res = {k: m.compute() for k, m in self.win.items()}
        for m in self.win.values():
            m.reset()
        self.win_batches = 0
        ne_s, ne_d = res["serving"]["ne"], res["dense"]["ne"]
        gap = relative_ne(ne_s, ne_d) if ne_d > 0 and math.isfinite(ne_d) else 0.0
        self.windows.append({"period": period, "batch": index, "ne_gap": gap})
        if self.challenger is not None:
            self._duel_window(period, index, res)
        self.end_window(period, index, dense, buffer)

    def _duel_window(self, period: int, index: int, res: dict[str, dict[str, float]]) -> None:
        n = res["serving"]["count"]
        self.duel.append([res["serving"]["logloss"] * n, res["challenger"]["logloss"] * n])
        recent = self.duel[-self.spec.handover_windows:]
        if len(recent) < self.spec.handover_windows:
            return
        champion, challenger = (sum(w[i] for w in recent) for i in (0, 1))
        if challenger < champion * (1.0 - self.cfg.handover_margin):
            self.serving, self.challenger = self.challenger, None
            outcome = "won"
        elif len(self.duel) >= self.cfg.challenger_patience:
            self.challenger = None
            outcome = "dropped"
        else:
            return
        self.handovers.append({"period": period, "batch": index, "windows": len(self.duel),
                               "gain": 1.0 - challenger / champion, "outcome": outcome})
        self.duel = []
        self.duel_ended(outcome)

    def duel_ended(self, outcome: str) -> None:
        """Hook: a challenger has ``"won"`` (it serves now) or was ``"dropped"``."""

    def end_window(self, period: int, index: int, dense: DenseTrack,
                   buffer: deque[Batch]) -> None:
        """Hook at the end of every scoring window (ad2s decides here)."""

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        """Hook at the end of every period (prune_once and d2s decide here)."""

    def dense_seconds(self, dense: DenseTrack) -> float:
        """Seconds of dense training this paradigm needs (all of it, unless it stops early)."""
        return dense.time_s

    # ------------------------------------------------------------------ regeneration
    def regenerate(self, dense: DenseTrack, buffer: deque[Batch], period: int, batch: int,
                   reason: str, **details: Any) -> None:
        """Make a sparse model from ``dense`` now; it serves, or challenges the serving one.

        Nothing happens without recent batches (an empty warm-up period): the transition needs
        data, and the strategy tries again at its next decision point.
        """
        if not buffer:
            return
        t = time.perf_counter()
        new = pruner_state = None
        # The transition works on a local copy (the model itself unless its tables are sharded).
        source, source_opt = self.comps.placement.gather(dense.model, dense.opt)
        if self.ctx.is_main:
            new, pruner_state = transition(source, source_opt, list(buffer),
                                           self.spec.density, self.method, self.pruner_state,
                                           self.comps, self.cfg)
        if self.ctx.world > 1:
            # Plain data travels; every rank rebuilds the same model from it.
            state, pruner_state = self.ctx.broadcast_object(
                (new.state_dict(), pruner_state) if self.ctx.is_main else None)
            new = SparseModel.from_state_dict(state, self.comps, self.cfg)
        else:
            new = SparseModel(*self.comps.placement.distribute(new.model, new.opt))
        self.pruner_state = pruner_state
        digest = mask_digest(new.model)
        digests = self.ctx.check_same(digest, f"{self.name} regenerated mask")
        counts = {fqn: int(m.sum()) for fqn, m in block_masks(new.model).items()}
        self.reference_mask = magnitude_topk(dense.model, counts, self.cfg.block_size)
        challenge = (self.serving is not None and self.regenerates
                     and self.spec.handover == "challenger")
        if challenge:
            self.challenger, self.duel = new, []
        else:
            self.serving = new
        seconds = time.perf_counter() - t
        self.time_s += seconds
        self.regenerations.append({
            "period": period, "batch": batch, "reason": reason,
            "handover": "challenger" if challenge else "immediate",
            "density": serving_density(new.model), "layers": mlp_densities(new.model),
            "mask_digest": digest, "ranks_agree": len(set(digests)) == 1,
            "seconds": seconds, "dense_s_per_step": dense.seconds_per_step(),
            "dense_time_s": dense.time_s, **details,
        })

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict[str, Any]:
        """What the results need beyond the per-period metrics (no strategy names involved)."""
        return {"regenerations": self.regenerations, "handovers": self.handovers,
                "windows": self.windows}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Tensors and plain data only (checkpoints load with ``weights_only=True``)."""
        return {
            "serving": (None if self.serving is None
                        else self.serving.state_dict(self.comps.placement)),
            "challenger": (None if self.challenger is None
                           else self.challenger.state_dict(self.comps.placement)),
            "pruner_state": self.pruner_state, "reference_mask": self.reference_mask,
            "regenerations": self.regenerations, "handovers": self.handovers,
            "windows": self.windows, "duel": self.duel, "time_s": self.time_s,
            "win": {k: m.state_dict() for k, m in self.win.items()},
            "win_batches": self.win_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        def model(key: str) -> SparseModel | None:
            s = state[key]
            return None if s is None else SparseModel.from_state_dict(s, self.comps, self.cfg)

        self.serving, self.challenger = model("serving"), model("challenger")
        self.pruner_state = state["pruner_state"]
        self.reference_mask = state["reference_mask"]
        for key in ("regenerations", "handovers", "windows", "duel", "time_s", "win_batches"):
            setattr(self, key, state[key])
        for k, m in self.win.items():
            m.load_state_dict(state["win"][k])


class DenseStrategy(Strategy):
    """Serve the dense model: the accuracy reference."""

    regenerates = False
    reference = True

    def step(self, local: Batch, global_rows: int, dense_logits: torch.Tensor
             ) -> list[torch.Tensor]:
        return [dense_logits]


class PruneOnceStrategy(Strategy):
    """Prune after the warm-up, then train only the sparse model with its pattern fixed."""

    regenerates = False

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        if self.serving is None and period + 1 >= self.cfg.warmup_periods:
            self.regenerate(dense, buffer, period, -1, "warmup")

    def dense_seconds(self, dense: DenseTrack) -> float:
        # The dense model is needed only up to the one transition.
        return self.regenerations[0]["dense_time_s"] if self.regenerations else dense.time_s


class D2SStrategy(Strategy):
    """Regenerate from the dense model every ``r`` periods after the warm-up.

    With the challenger handover a new regeneration replaces a challenger still in flight (the
    newer one comes from a dense model that has seen more data).
    """

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        done = period + 1 - self.cfg.warmup_periods
        if done >= 0 and done % self.spec.r == 0:
            self.regenerate(dense, buffer, period, -1, "warmup" if done == 0 else "schedule")


class AD2SStrategy(Strategy):
    """Regenerate when the data says so: the NE gap to dense grew, or the mask drifted.

    Every window (``window_batches`` batches) the serving and the dense model are scored on the
    same rows (a paired gap). The trigger is a change detector on that gap: it fires when the
    mean gap of the last ``min_interval`` windows exceeds the baseline — the lowest mean gap over
    ``baseline_windows`` windows seen since the last regeneration — by more than
    ``ne_tolerance`` (relative NE): the serving model has fallen behind where it stood. The
    baseline averages more windows than the trigger: the lowest of many short noisy means sits
    below the true level, and noise alone then crossed the tolerance on stationary data. A
    fixed bar on the gap itself would fire forever at a density whose steady gap is above the
    bar, and never in a model that has grown a large lead. Mask
    drift (the share of the serving blocks the dense model's current magnitude ranking would no
    longer pick, against its ranking at the last regeneration) above ``drift_bound`` fires too.
    No trigger within ``min_interval`` windows of the last regeneration; ``max_interval``
    windows force one. A trigger while a challenger is in flight replaces it (as in d2s: the
    newer one comes from a dense model that has seen more data); waiting for a losing
    challenger to run out of patience kept ad2s on a stale model for two periods after a
    regime change.

    Follow-up (``cfg.follow_up``, default on): a regeneration the gap triggered keeps the
    baseline of before the change, so ad2s regenerates again every ``min_interval`` windows
    while the serving model is still more than ``ne_tolerance`` behind where it stood. The
    first model after a regime change comes from a dense model that has seen one or two windows
    of the new data; the follow-ups copy one that has learned more. A dropped challenger shows
    that a fresh model does no better: its level becomes the baseline.

    Back-off: each challenger in a row that is dropped (it never beat the serving model)
    doubles both intervals, up to ``2 ** cfg.max_backoff``; a challenger that wins resets them. A
    stream on which regenerating does not pay (stationary data, or a serving model whose mask
    is still good) then stops paying for transitions and for training a second sparse model,
    while the first regeneration after a change comes as early as before.
    """

    def __init__(self, spec: StrategySpec, cfg: OnlineConfig, comps: Components,
                 ctx: DistContext):
        super().__init__(spec, cfg, comps, ctx)
        self.method = "learned"
        self.windows_since = 0
        self.best_smoothed: float | None = None
        self.dropped_in_row = 0

    def duel_ended(self, outcome: str) -> None:
        self.dropped_in_row = (min(self.cfg.max_backoff, self.dropped_in_row + 1)
                               if outcome == "dropped" else 0)
        if outcome == "dropped" and self.cfg.follow_up:
            self.best_smoothed = None  # a fresh model did no better: this level is the baseline

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        if self.serving is None and period + 1 >= self.cfg.warmup_periods:
            self.regenerate(dense, buffer, period, -1, "warmup")
            self.windows_since, self.best_smoothed = 0, None

    def mask_drift(self, dense: DenseTrack) -> float:
        if not self.reference_mask:
            return 0.0
        counts = {fqn: int(m.sum()) for fqn, m in self.reference_mask.items()}
        now = magnitude_topk(dense.model, counts, self.cfg.block_size)
        changed = sum(int((m & ~now[fqn]).sum()) for fqn, m in self.reference_mask.items())
        return changed / max(1, sum(counts.values()))

    def mean_gap(self, windows: int) -> float:
        """Mean NE gap of the last ``windows`` windows since the last regeneration."""
        recent = self.windows[-min(windows, self.windows_since):]
        return sum(w["ne_gap"] for w in recent) / len(recent)

    def end_window(self, period: int, index: int, dense: DenseTrack,
                   buffer: deque[Batch]) -> None:
        self.windows_since += 1
        window = self.windows[-1]
        smooth = self.mean_gap(self.cfg.min_interval)
        drift = self.mask_drift(dense)
        full = self.windows_since >= self.cfg.min_interval
        backoff = 2 ** self.dropped_in_row
        level = self.mean_gap(self.cfg.baseline_windows)
        if full and (self.best_smoothed is None or level < self.best_smoothed):
            self.best_smoothed = level
        window.update(smoothed_gap=smooth, drift=drift,
                      baseline=self.best_smoothed if full else None)
        reason = None
        if self.windows_since >= self.cfg.max_interval * backoff:
            reason = "max_interval"
        elif full and self.windows_since >= self.cfg.min_interval * backoff:
            if smooth - self.best_smoothed > self.cfg.ne_tolerance:
                reason = "ne_gap"
            elif drift > self.cfg.drift_bound:
                reason = "mask_drift"
        if reason is not None:
            self.regenerate(dense, buffer, period, index, reason, ne_gap=window["ne_gap"],
                            drift=drift, smoothed_gap=smooth, baseline=self.best_smoothed)
            self.windows_since = 0
            if not (reason == "ne_gap" and self.cfg.follow_up):
                self.best_smoothed = None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(windows_since=self.windows_since, best_smoothed=self.best_smoothed,
                     dropped_in_row=self.dropped_in_row)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.windows_since, self.best_smoothed = state["windows_since"], state["best_smoothed"]
        self.dropped_in_row = state.get("dropped_in_row", 0)  # absent before the back-off


#: The strategy kinds by name: ``--strategies``, the config's validation and the docs read it.
STRATEGIES: dict[str, type[Strategy]] = {
    "dense": DenseStrategy, "prune_once": PruneOnceStrategy, "d2s": D2SStrategy,
    "ad2s": AD2SStrategy,
}


def make_strategy(spec: StrategySpec, cfg: OnlineConfig, comps: Components,
                  ctx: DistContext) -> Strategy:
    """The strategy object for ``spec``."""
    return STRATEGIES[spec.kind](spec, cfg, comps, ctx)
