"""Learned layer-wise sparsity (DESIGN §5, the ``learned`` method).

Each layer ``l`` has a learnable threshold ``t_l`` (stored as ``log t_l``, so it stays positive
and Adam moves it by relative amounts whatever the layer's scale). Group scores are divided by
their layer's mean, so thresholds are unitless and one temperature suits every layer. During a
transition the forward pass runs every target layer through ``masked_linear`` with the soft mask

    m_g = sigmoid(margin_g / tau),   margin_g = (s_g - t_l) / t_l,

the loss is ``task + lambda * (D(t) - D*) + rho/2 * (D(t) - D*)^2`` with ``D(t)`` the
weight-weighted global density of the soft masks, ``lambda >= 0`` follows dual ascent (the
quadratic term damps its oscillation, see :class:`LearnedConfig`) and ``tau`` is annealed
geometrically. The
temperature acts on the relative margin (rather than on ``s_g - t_l``) so that the soft mask
sharpens in the same order as the final ranking, which is by margin over all layers: the hard
masks are the best-margin groups up to the budget, projected exactly (see ``allocation``). At the
optimum the marginal loss per kept weight is equal across layers, so the per-layer densities
come from the data, not from a hand-set table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from adsparse.pruning.schedules import geometric_anneal
from adsparse.pruning.scorers import TaylorScorer
from adsparse.pruning.targets import Target, TransitionSession, check_loss

__all__ = ["LearnedConfig", "LearnedThresholds", "normalize_scores", "run_learned"]

_TINY = 1e-12


@dataclass
class LearnedConfig:
    """Knobs of the learned transition (defaults tuned on the pruning benchmark's MLP).

    Attributes:
        tau_start, tau_end: temperature of the soft mask at the first and last step, in units
            of the relative margin ``(s - t)/t``.
        threshold_lr: Adam learning rate of the log-thresholds.
        dual_lr: step of the dual ascent on the budget multiplier ``lambda``.
        penalty: weight ``rho`` of a quadratic term ``rho/2 * (D - D*)^2`` added to the
            Lagrangian (the method of multipliers). Without it the multiplier overshoots, the
            soft density swings to zero and, once the temperature is low, the saturated
            sigmoids pass no gradient back (measured on the benchmark MLP and the tests).
        train_weights: also train the target layers' weights and biases through the soft mask.
    """

    tau_start: float = 0.2
    tau_end: float = 0.01
    threshold_lr: float = 0.05
    dual_lr: float = 1.0
    penalty: float = 10.0
    train_weights: bool = True


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their layer's mean: unitless, so thresholds compare across layers."""
    s = scores.detach().float()
    return s / s.mean().clamp_min(_TINY)


def _quantile_threshold(scores: torch.Tensor, sizes: torch.Tensor, density: float) -> float:
    """A threshold above which groups hold about ``density`` of the layer's weights."""
    s = scores.flatten().double().cpu()
    order = torch.sort(s, descending=True).indices
    csum = sizes.flatten().double().cpu()[order].cumsum(0)
    k = int(torch.searchsorted(csum, torch.tensor([density * float(csum[-1])],
                                                  dtype=torch.float64)))
    hi = float(s[order[min(k, s.numel() - 1)]])
    lo = float(s[order[min(k + 1, s.numel() - 1)]])
    # Midway between the last kept and the first dropped group: both get a nonzero margin.
    return max(0.5 * (hi + lo), 1e-6)


class LearnedThresholds:
    """The per-layer log-thresholds and the budget multiplier, kept across transitions."""

    def __init__(self) -> None:
        self.log_t: dict[str, torch.Tensor] = {}
        self.dual = 0.0

    def prepare(self, targets: list[Target], scores: list[torch.Tensor], density: float,
                tau: float) -> None:
        """Warm start the layers seen before; start new ones at the uniform ``density`` cut.

        New layers are then shifted together (one common factor on their thresholds) until the
        soft masks at temperature ``tau`` hold ``density`` of the weights: a soft mask keeps a
        share of every group, so the hard cut alone would start far over budget and the first
        steps would be spent correcting that instead of learning the allocation.
        """
        fresh = []
        for t, s in zip(targets, scores):
            if t.fqn in self.log_t:
                self.log_t[t.fqn] = self.log_t[t.fqn].detach().to(t.weight.device)
            else:
                thr = _quantile_threshold(s, t.sizes, density)
                self.log_t[t.fqn] = torch.tensor(thr, device=t.weight.device).log()
                fresh.append(t.fqn)
        if fresh:
            base = {f: self.log_t[f].clone() for f in fresh}

            def soft_density(shift: float) -> float:
                for f in fresh:
                    self.log_t[f] = base[f] + shift
                with torch.no_grad():
                    return float(self.density(targets, self.soft_masks(targets, scores, tau)))

            lo, hi = -10.0, 10.0  # soft density falls as the shift (log factor) grows
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if soft_density(mid) > density else (lo, mid)
            soft_density(0.5 * (lo + hi))
        for t in targets:
            self.log_t[t.fqn].requires_grad_(True)

    def thresholds(self) -> dict[str, float]:
        return {fqn: float(v.detach().exp()) for fqn, v in self.log_t.items()}

    def margins(self, targets: list[Target], scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """``(s - t_l)/t_l`` per group: the key of the final global ranking (differentiable)."""
        out = []
        for t, s in zip(targets, scores):
            thr = self.log_t[t.fqn].exp()
            out.append((s - thr) / thr)
        return out

    def soft_masks(self, targets: list[Target], scores: list[torch.Tensor], tau: float
                   ) -> list[torch.Tensor]:
        """``sigmoid(margin / tau)`` per layer, differentiable in the thresholds."""
        return [torch.sigmoid(m / tau) for m in self.margins(targets, scores)]

    def cap(self, targets: list[Target], scores: list[torch.Tensor], floors: list[float]) -> None:
        """Project the thresholds onto the layer floors: ``t_l`` at most the score of the last
        group a layer needs to keep ``floors[l]`` weights (its best group when the floor is 0).

        A threshold above all of a layer's scores leaves every sigmoid saturated, so neither the
        task nor the budget term can bring the layer back (measured: whole layers of the
        benchmark MLP died that way within 40 steps). Capped, the layer's best groups always
        sit at the soft boundary, where the gradient flows.
        """
        with torch.no_grad():
            for t, s, floor in zip(targets, scores, floors):
                flat = s.flatten()
                order = torch.sort(flat, descending=True).indices
                csum = t.sizes.flatten().to(flat.device, torch.float64)[order].cumsum(0)
                need = int(torch.searchsorted(csum, torch.tensor([floor - 1e-9], device=csum.device,
                                                                 dtype=csum.dtype)))
                top = float(flat[order[min(need, flat.numel() - 1)]])
                if top > 0:
                    self.log_t[t.fqn].clamp_(max=torch.tensor(top).log().item())

    @staticmethod
    def density(targets: list[Target], masks: list[torch.Tensor]) -> torch.Tensor:
        """Global density implied by (soft) masks: groups weighted by their real weights."""
        kept = sum((t.sizes.to(m.device, m.dtype) * m).sum() for t, m in zip(targets, masks))
        return kept / sum(t.num_weights for t in targets)

    def state_dict(self) -> dict[str, Any]:
        return {"log_thresholds": {k: v.detach().cpu().clone() for k, v in self.log_t.items()},
                "dual": self.dual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_t = {k: v.detach().clone().float() for k, v in state["log_thresholds"].items()}
        self.dual = float(state["dual"])


def run_learned(session: TransitionSession, thresholds: LearnedThresholds,
                scores_fn: Callable[[Target], torch.Tensor], density: float,
                floors: list[float], steps: int,
                batches: Iterator[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
                weight_optimizer: torch.optim.Optimizer | None, config: LearnedConfig,
                taylor: TaylorScorer | None, history: list[dict[str, float]]
                ) -> list[torch.Tensor]:
    """The soft-mask transition; returns the final margins of every target layer.

    ``scores_fn(target)`` gives the raw scores at the current step (magnitude of the current
    weights, or the Taylor average). ``weight_optimizer`` (``None``: weights are not trained)
    steps the target layers' Parameters; the thresholds have an Adam of their own.
    """
    targets, proxies = session.targets, session.proxies
    scores = [normalize_scores(scores_fn(t)) for t in targets]
    thresholds.prepare(targets, scores, density, config.tau_start)
    params = [thresholds.log_t[t.fqn] for t in targets]
    threshold_opt = torch.optim.Adam(params, lr=config.threshold_lr)
    for step in range(steps):
        tau = geometric_anneal(step, steps, config.tau_start, config.tau_end)
        if step:
            scores = [normalize_scores(scores_fn(t)) for t in targets]
        # Two evaluations of the same soft mask: the forward copy's gradient is the task-only
        # dL/dm that the Taylor scorer needs; the budget term goes through the other one.
        forward_masks = thresholds.soft_masks(targets, scores, tau)
        for proxy, m in zip(proxies, forward_masks):
            if taylor is not None:
                m.retain_grad()
            proxy.mask = m
        budget_density = thresholds.density(targets, thresholds.soft_masks(targets, scores, tau))
        task = check_loss(loss_fn(session.model, next(batches)), step, "learned transition")
        gap = budget_density - density
        loss = task + thresholds.dual * gap + 0.5 * config.penalty * gap * gap
        threshold_opt.zero_grad(set_to_none=True)
        if weight_optimizer is not None:
            weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        threshold_opt.step()
        thresholds.cap(targets, scores, floors)
        if weight_optimizer is not None:
            weight_optimizer.step()
        gap = float(gap.detach())
        thresholds.dual = max(0.0, thresholds.dual + config.dual_lr * gap)
        if taylor is not None:
            for t, m in zip(targets, forward_masks):
                taylor.update(t.fqn, m.grad)
        record = {"step": step, "loss": float(task.detach()), "tau": tau,
                  "soft_density": gap + density, "dual": thresholds.dual}
        for t, m in zip(targets, forward_masks):
            record[f"density/{t.fqn}"] = float((t.sizes.to(m.device) * m.detach()).sum()
                                               / t.num_weights)
        history.append(record)
    for proxy in proxies:
        proxy.mask = proxy.mask.detach()
    final = [normalize_scores(scores_fn(t)) for t in targets]
    with torch.no_grad():
        return thresholds.margins(targets, final)
