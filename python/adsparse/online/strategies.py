"""The paradigms of DESIGN.md §5: dense, prune_once, d2s and ad2s.

A run owns one :class:`DenseTrack` (the dense model trained on everything) and one
:class:`Strategy` per paradigm. Sharing the dense model is exact, not an approximation: d2s,
ad2s and the dense reference would each train the same deterministic model on the same batches,
so training it once gives the same numbers at a quarter of the cost.

Progressive validation: the logits a model returns from :func:`train_step` come from the forward
pass that precedes that batch's update, so they are predictions made before the model trained on
the batch. Reusing that forward for evaluation halves the compute and changes nothing.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adsparse.data.base import Batch
from adsparse.layout import BlockSparseWeight, block_norms, block_weight_counts
from adsparse.nn import BlockSparseLinear, prunable_layers, sparsify_
from adsparse.online.components import Components, MetricsLike, loss_fn
from adsparse.online.config import OnlineConfig, StrategySpec
from adsparse.online.distributed import DistContext, mask_digest

__all__ = ["DenseTrack", "Strategy", "carry_adam_state", "make_strategy", "mlp_densities",
           "serving_density", "train_step"]


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # Fused Adam: one kernel per step instead of a dozen passes over the embedding tables,
    # which dominate the parameter count (dense gradients, see DLRM's sparse_grad).
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def carry_adam_state(src: nn.Module, src_opt: torch.optim.Optimizer, dst: nn.Module,
                     dst_opt: torch.optim.Optimizer) -> int:
    """Give ``dst``'s parameters the Adam state of the ``src`` parameters they were copied from.

    ``dst`` is ``src`` after ``sparsify_``: a parameter of the same name and shape (embeddings,
    biases, dense layers) takes its state as is; the ``values`` of a :class:`BlockSparseLinear`
    take the stored blocks' entries of the dense ``weight``'s state, packed in the same order.
    Without this a regenerated model starts with a fresh Adam, whose first steps move every
    parameter (the embedding tables included) by about ``lr`` whatever its gradient's scale.
    Returns the number of parameters that got a state.
    """
    src_params = dict(src.named_parameters())
    modules = dict(dst.named_modules())
    carried = 0
    for name, p in dst.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        module = modules[mod_name]
        if isinstance(module, BlockSparseLinear) and leaf == "values":
            w = src_params.get(f"{mod_name}.weight" if mod_name else "weight")
            pack = (lambda t, m=module: BlockSparseWeight.from_dense(
                t, m.block_size, mask=m.block_mask()).values)
        else:
            w = src_params.get(name)
            pack = (lambda t: t)
        state = src_opt.state.get(w) if w is not None else None
        if not state:
            continue
        new = {}
        for key, v in state.items():
            new[key] = v.clone() if key == "step" else pack(v.detach()).clone()
            if key != "step" and new[key].shape != p.shape:
                break
        else:
            dst_opt.state[p] = new
            carried += 1
    return carried


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


def _distill(model: nn.Module, teacher: nn.Module, batches: Sequence[Batch], epochs: int,
             lr: float) -> None:
    """Train ``model`` to match ``teacher``'s predictions on ``batches`` (a fresh Adam).

    Hardening leaves the new model far from the dense one (held-out log-loss about 6-7% above
    the dense model's on the default stream); training it on the recent labels again fits rows
    the dense model has already learned (and overfits them, embeddings most), while the dense
    model's own predictions carry its function without a second pass over the labels. All
    parameters train: on the default stream that gave d2s (r=1) +1.19% NE against +1.45% when
    only the block-sparse layers trained (benchmarks/RESULTS.md).
    """
    with torch.no_grad():
        soft = [Batch(b.dense, b.sparse, torch.sigmoid(teacher(b.dense, b.sparse)))
                for b in batches]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for b in soft:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, b).backward()
            opt.step()


def mlp_densities(model: nn.Module) -> dict[str, float]:
    """Density of every block-sparse layer of ``model`` (by fully-qualified name)."""
    return {fqn: m.density for fqn, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


def serving_density(model: nn.Module) -> float:
    """Kept share of all MLP weights (block-sparse and dense linear layers together)."""
    kept = total = 0.0
    for _, m in model.named_modules():
        if isinstance(m, BlockSparseLinear):
            n = m.out_features * m.in_features
            kept, total = kept + m.density * n, total + n
        elif isinstance(m, nn.Linear):
            kept, total = kept + m.weight.numel(), total + m.weight.numel()
    return kept / total if total else 1.0


def _magnitude_topk(dense: nn.Module, counts: dict[str, int],
                    block_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per layer, the ``counts[fqn]`` blocks of largest magnitude score ``‖W_g‖/√|g|``."""
    layers = dict(prunable_layers(dense))
    out = {}
    for fqn, k in counts.items():
        w = layers[fqn].weight.detach()
        score = block_norms(w, block_size) / block_weight_counts(tuple(w.shape), block_size).to(
            w.device).float().sqrt()
        flat = torch.zeros(score.numel(), dtype=torch.bool, device=w.device)
        flat[torch.topk(score.reshape(-1), k).indices] = True
        out[fqn] = flat.view_as(score)
    return out


class DenseTrack:
    """The dense model that trains on every batch (the reference and the source of d2s/ad2s)."""

    def __init__(self, comps: Components, cfg: OnlineConfig, ctx: DistContext):
        self.model = comps.make_model().to(cfg.device)
        self.opt = _optimizer(self.model, cfg.lr)
        self.ctx = ctx
        self.time_s = 0.0

    def step(self, local: Batch, global_rows: int) -> torch.Tensor:
        t = time.perf_counter()
        logits = train_step(self.model, self.opt, local, global_rows, self.ctx)
        self.time_s += time.perf_counter() - t
        return logits

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "time_s": self.time_s}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.time_s = state["time_s"]


class Strategy:
    """Base: serves the dense model until a sparse model exists, then serves and trains that.

    Subclasses decide *when* to regenerate; :meth:`regenerate` is the one way a sparse model is
    made: a pruning transition on a copy of the dense model over the recent batches,
    ``sparsify_`` with the pruner's masks, then ``distill_epochs`` over the same batches in which
    the new model learns the dense model's predictions. The new model starts with the
    dense model's Adam state (:func:`carry_adam_state`). It runs on rank 0 and is broadcast.
    """

    def __init__(self, spec: StrategySpec, cfg: OnlineConfig, comps: Components,
                 ctx: DistContext):
        self.spec, self.cfg, self.comps, self.ctx = spec, cfg, comps, ctx
        self.name = spec.name
        self.method = cfg.pruner
        self.serving: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.pruner_state: dict | None = None
        self.reference_mask: dict[str, torch.Tensor] | None = None
        self.regenerations: list[dict[str, Any]] = []
        self.time_s = 0.0

    # ------------------------------------------------------------------ per batch
    def step(self, local: Batch, global_rows: int, dense_logits: torch.Tensor) -> torch.Tensor:
        """Logits this strategy serves for ``local`` (before training on it), then train."""
        if self.serving is None:
            return dense_logits
        t = time.perf_counter()
        logits = train_step(self.serving, self.opt, local, global_rows, self.ctx)
        self.time_s += time.perf_counter() - t
        return logits

    def after_batch(self, period: int, index: int, preds: torch.Tensor, dense_preds: torch.Tensor,
                    labels: torch.Tensor, dense: DenseTrack, buffer: deque[Batch]) -> None:
        """Hook after every batch with the gathered predictions (ad2s decides here)."""

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        """Hook at the end of every period (prune_once and d2s decide here)."""

    # ------------------------------------------------------------------ regeneration
    def regenerate(self, dense: DenseTrack, buffer: Sequence[Batch], period: int, batch: int,
                   reason: str, **details: Any) -> None:
        t = time.perf_counter()
        payload = None
        if self.ctx.is_main:
            payload = self._transition(dense, buffer)
        if self.ctx.world > 1:
            payload = self.ctx.broadcast_object(
                None if payload is None else (payload[0].cpu(), payload[1], payload[2]))
        model, pruner_state, opt_state = payload
        self.serving = model.to(self.cfg.device)
        self.pruner_state = pruner_state
        self.opt = _optimizer(self.serving, self.cfg.lr)
        self.opt.load_state_dict(opt_state)
        digest = mask_digest(self.serving)
        digests = self.ctx.check_same(digest, f"{self.name} serving mask")
        counts = {fqn: int(m.block_mask().sum()) for fqn, m in self.serving.named_modules()
                  if isinstance(m, BlockSparseLinear)}
        self.reference_mask = _magnitude_topk(dense.model, counts, self.cfg.block_size)
        self.time_s += time.perf_counter() - t
        self.regenerations.append({
            "period": period, "batch": batch, "reason": reason,
            "density": serving_density(self.serving), "layers": mlp_densities(self.serving),
            "mask_digest": digest, "ranks_agree": len(set(digests)) == 1,
            "seconds": time.perf_counter() - t, "dense_time_s": dense.time_s, **details,
        })

    def _transition(self, dense: DenseTrack, buffer: Sequence[Batch]
                    ) -> tuple[nn.Module, dict, dict]:
        model = copy.deepcopy(dense.model)
        pruner = self.comps.make_pruner(model, self.spec.density, self.method,
                                        self.cfg.block_size)
        if self.pruner_state is not None:
            pruner.load_state_dict(self.pruner_state)  # warm start from the last transition
        dev = self.cfg.device
        batches = [Batch(b.dense.to(dev), b.sparse.to(dev), b.labels.to(dev)) for b in buffer]
        masks = pruner.prune(batches, loss_fn, steps=self.cfg.prune_steps)
        model = sparsify_(model, masks=masks, block_size=self.cfg.block_size)
        if self.cfg.distill_epochs:
            _distill(model, dense.model, batches, self.cfg.distill_epochs, self.cfg.lr)
        # Recovery: the new pattern trains on the recent batches (already seen and scored,
        # so progressive validation is untouched) before it serves.
        opt = _optimizer(model, self.cfg.lr)
        if self.cfg.carry_optimizer:
            carry_adam_state(dense.model, dense.opt, model, opt)
        for _ in range(self.cfg.finetune_epochs):
            for b in batches:
                train_step(model, opt, b, b.labels.shape[0], DistContext())
        return model, pruner.state_dict(), opt.state_dict()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        # The serving model is pickled whole: its block pattern is part of its structure.
        return {"serving": self.serving, "opt": None if self.opt is None else self.opt.state_dict(),
                "pruner_state": self.pruner_state, "reference_mask": self.reference_mask,
                "regenerations": self.regenerations, "time_s": self.time_s}

    def load_state_dict(self, state: dict) -> None:
        self.serving = state["serving"]
        if self.serving is not None:
            self.serving = self.serving.to(self.cfg.device)
            self.opt = _optimizer(self.serving, self.cfg.lr)
            self.opt.load_state_dict(state["opt"])
        self.pruner_state = state["pruner_state"]
        self.reference_mask = state["reference_mask"]
        self.regenerations = state["regenerations"]
        self.time_s = state["time_s"]


class DenseStrategy(Strategy):
    """Serve the dense model: the accuracy reference."""

    def step(self, local: Batch, global_rows: int, dense_logits: torch.Tensor) -> torch.Tensor:
        return dense_logits


class PruneOnceStrategy(Strategy):
    """Prune after the warm-up, then train only the sparse model with its pattern fixed."""

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        if self.serving is None and period + 1 >= self.cfg.warmup_periods:
            self.regenerate(dense, buffer, period, -1, "warmup")


class D2SStrategy(Strategy):
    """Regenerate the serving model from the dense one every ``r`` periods after the warm-up."""

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        done = period + 1 - self.cfg.warmup_periods
        if done >= 0 and done % self.spec.r == 0:
            self.regenerate(dense, buffer, period, -1, "warmup" if done == 0 else "schedule")


class AD2SStrategy(Strategy):
    """Regenerate when the data says so: NE gap to dense or mask drift, within interval bounds.

    Every ``window_batches`` batches the window's NE of the serving and of the dense model are
    compared (same rows, so the gap is a paired estimate), and the mask drift is measured: the
    share of the serving blocks that the dense model's current magnitude ranking would no longer
    pick, relative to its ranking at the last regeneration (so a pruner whose criterion is not
    pure magnitude does not read as drift from the start).

    The NE trigger fires when the mean gap of the last ``min_interval`` windows (one window
    alone is too noisy) exceeds ``ne_tolerance`` *and* the gap that freshly regenerated models
    showed in their first ``min_interval`` windows (running mean over all regenerations). A new
    model is not free: it has not adapted to its pattern yet, and on the default stream it
    still costs about 1% NE in its first period against a model that kept training with its
    pattern; regenerating is only worth it once the serving model has fallen behind a fresh one.
    """

    def __init__(self, spec: StrategySpec, cfg: OnlineConfig, comps: Components,
                 ctx: DistContext):
        super().__init__(spec, cfg, comps, ctx)
        self.method = "learned"
        self.win_sparse: MetricsLike = comps.make_metrics()
        self.win_dense: MetricsLike = comps.make_metrics()
        self.win_batches = 0
        self.windows_since = 0
        self.windows: list[dict[str, Any]] = []
        self.fresh_gaps: list[float] = []  # gaps of the first windows after regenerations

    def end_period(self, period: int, dense: DenseTrack, buffer: deque[Batch]) -> None:
        if self.serving is None and period + 1 >= self.cfg.warmup_periods:
            self.regenerate(dense, buffer, period, -1, "warmup")
            self.windows_since = 0

    def mask_drift(self, dense: DenseTrack) -> float:
        if not self.reference_mask:
            return 0.0
        counts = {fqn: int(m.sum()) for fqn, m in self.reference_mask.items()}
        now = _magnitude_topk(dense.model, counts, self.cfg.block_size)
        changed = sum(int((m & ~now[fqn]).sum()) for fqn, m in self.reference_mask.items())
        return changed / max(1, sum(counts.values()))

    def after_batch(self, period: int, index: int, preds: torch.Tensor, dense_preds: torch.Tensor,
                    labels: torch.Tensor, dense: DenseTrack, buffer: deque[Batch]) -> None:
        if self.serving is None:
            return
        self.win_sparse.update(labels, preds)
        self.win_dense.update(labels, dense_preds)
        self.win_batches += 1
        if self.win_batches < self.cfg.window_batches:
            return
        ne_s, ne_d = self.win_sparse.compute()["ne"], self.win_dense.compute()["ne"]
        self.win_sparse.reset()
        self.win_dense.reset()
        self.win_batches = 0
        self.windows_since += 1
        gap = (ne_s - ne_d) / ne_d if ne_d > 0 and math.isfinite(ne_d) else 0.0
        drift = self.mask_drift(dense)
        if self.windows_since <= self.cfg.min_interval:
            self.fresh_gaps.append(gap)
        bar = max(self.cfg.ne_tolerance, sum(self.fresh_gaps) / len(self.fresh_gaps))
        # One window (16 batches) is too noisy to act on (paired gaps swing by +-3% on the
        # default stream); the trigger uses the mean gap of the last min_interval windows.
        self.windows.append({"period": period, "batch": index, "ne_gap": gap, "drift": drift,
                             "bar": bar})
        recent = self.windows[-min(self.cfg.min_interval, self.windows_since):]
        smooth = sum(w["ne_gap"] for w in recent) / len(recent)
        self.windows[-1]["smoothed_gap"] = smooth
        reason = None
        if self.windows_since >= self.cfg.max_interval:
            reason = "max_interval"
        elif self.windows_since >= self.cfg.min_interval:
            if smooth > bar:
                reason = "ne_gap"
            elif drift > self.cfg.drift_bound:
                reason = "mask_drift"
        if reason is not None:
            self.regenerate(dense, buffer, period, index, reason, ne_gap=gap, drift=drift,
                            bar=bar, smoothed_gap=smooth)
            self.windows_since = 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(win_sparse=self.win_sparse, win_dense=self.win_dense,
                     win_batches=self.win_batches, windows_since=self.windows_since,
                     windows=self.windows, fresh_gaps=self.fresh_gaps)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.win_sparse, self.win_dense = state["win_sparse"], state["win_dense"]
        self.win_batches, self.windows_since = state["win_batches"], state["windows_since"]
        self.windows = state["windows"]
        self.fresh_gaps = state["fresh_gaps"]


_KINDS = {"dense": DenseStrategy, "prune_once": PruneOnceStrategy, "d2s": D2SStrategy,
          "ad2s": AD2SStrategy}


def make_strategy(spec: StrategySpec, cfg: OnlineConfig, comps: Components,
                  ctx: DistContext) -> Strategy:
    """The strategy object for ``spec``."""
    return _KINDS[spec.kind](spec, cfg, comps, ctx)
