"""Learned layer-wise sparsity, the ``learned`` method (the algorithm: docs/pruning.md).

The per-layer densities are chosen to minimize the measured loss, in the units of the loss in
every layer, under the one global weight budget:

    minimize  sum_l C_l(x_l)   subject to   sum_l x_l = budget,   x_l >= min_weights[l],

where ``x_l`` is the number of weights layer ``l`` keeps and ``C_l(x)`` is the increase of the
task loss when only layer ``l`` is cut to its best ``x`` weights (by the pruner's scorer). The
transition is gradual, as in ``gmp``: the global density follows the cubic schedule over
``steps`` training steps, in ``rounds`` rounds. At the start of each round, each layer's
*sensitivity profile* ``C_l`` is measured at a few densities around the round's expected cut,
on batches the round has not trained on (forward passes through ``masked_linear``, no
gradients), and the round's target allocation is the optimum of the problem above on the
convex hulls of the profiles: a greedy knapsack that removes weights where the loss per removed
weight is lowest (:func:`~adsparse.pruning.allocation.allocate_removal`). During the round each
layer moves to its target along the cubic schedule, training through hard nested masks; the
last round ends exactly at the budget. A layer the loss does not need (its output scaled away
downstream, or duplicated) costs nothing to cut, so it is cut first, whatever its weights'
magnitude; a layer whose every weight matters keeps its share.

Cuts are measured net of what training repairs first: at block granularity with the layer's
kept weights refit by least squares to its old output (:mod:`~adsparse.pruning.repair`,
``LearnedConfig.repair``), a refit the transition then applies as its masks move
(``realize``); at element granularity the joint check adds back the mean of what a cut removes
(``compensate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adsparse.pruning.allocation import (
    Ranked,
    allocate_removal,
    lamp_scores,
    rank_groups,
    select_allocation,
    select_global,
)
from adsparse.pruning.gmp import train_step
from adsparse.pruning.repair import InputStats, expand_groups, realize_, repaired_nested
from adsparse.pruning.schedules import cubic_density
from adsparse.pruning.targets import Context, check_loss

__all__ = ["LearnedConfig", "run_learned"]

# allocations (each a list of masks) -> each one's loss increase per batch
JointCost = Callable[[list[list[torch.Tensor]]], list[list[float]]]


@dataclass
class LearnedConfig:
    """Knobs of the learned transition (defaults: docs/pruning.md, chosen on the benchmark).

    Attributes:
        rounds: allocation rounds of a transition, at most (one profile measurement each).
        round_steps: fewest training steps per round: a transition of ``steps`` steps has
            ``min(rounds, steps // round_steps)`` rounds (at least one).
        points: densities measured per layer in a profile (plus its ``min_weights``).
        spread: the profile's densities lie between the expected cut ``g`` and the current
            density ``c`` as ``c * (g / c) ** a`` with ``a`` from ``1 / spread`` to ``spread``.
        profile_batches: batches every profile point is measured on (the same for all).
        update_every: training steps between two mask updates within a round.
        first_order: keep the first-order part ``-sum_cut dL/dM`` in the measured costs
            (off: it is mostly label noise on a few batches, see :func:`_profiles`).
        compensate: the joint check measures each allocation's cut with the mean of what it
            removes from every layer (``W_removed @ E[x]``) added back to that layer's output:
            the part of the damage that training repairs first, so that allocations are
            compared by what stays lost (docs/pruning.md).
        repair: at block granularity, measure every cut (profiles and joint check) with the
            layer's kept weights refit by least squares to its old output
            (:mod:`~adsparse.pruning.repair`): the damage that stays once training has done
            what the kept inputs allow, not the damage of the raw cut. Element granularity
            measures raw cuts (a refit per row is too costly there).
        realize: with ``repair``, also *apply* the refit: at every mask update of the
            transition, the kept weights of each cut layer are refit to its output before the
            update and its bias takes the mean of what was cut, so the model is where the
            measurement assumed (the fine-tune after a transition is too short to get there by
            itself; docs/pruning.md).
        realize_steps: with ``realize``, training steps between two mask updates at least
            (each update refits every cut layer; each costs about a training step of the layer).
        cut_ahead: with ``realize``, move the masks at the first step of each interval of
            ``realize_steps``, to the density the schedule reaches at its end, instead of at its
            last step to where it is then: the layers then train cut, not dense, until the next
            update (~10% of a DLRM block transition, the same NE over 10 seeds; docs/pruning.md).
        candidates: choose each round's allocation among the knapsack's and the standard ones
            (same factor, global, LAMP, half-way) by the loss of cutting all layers at once.
        profile_budget: forward passes the profiles may spend per training step of the
            transition (a training step costs about three): fewer rounds when a short
            transition cannot afford more. At least one round always runs.
        min_share: every layer keeps at least this share of the target density (on top of
            ``min_layer_density``): a hedge against the profiles' myopia, since a layer the
            current model barely uses may be needed once training goes on (0.25 starved the
            online DLRM's first top layer and cost 2.5 points of NE; online runs use 0.75;
            docs/pruning.md). Met in whole groups: the floor is the share less one group.
    """

    rounds: int = 4
    round_steps: int = 25
    points: int = 5
    spread: float = 2.2
    profile_batches: int = 2
    update_every: int = 1
    first_order: bool = False
    compensate: bool = True
    repair: bool = True
    realize: bool = True
    realize_steps: int = 12
    cut_ahead: bool = True
    candidates: bool = True
    min_share: float = 0.5
    profile_budget: float = 1.5

    def validate(self) -> None:
        for name in ("rounds", "round_steps", "points", "profile_batches", "update_every",
                     "realize_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"LearnedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.spread >= 1.0:
            raise ValueError(f"LearnedConfig.spread must be >= 1, got {self.spread}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"LearnedConfig.min_share must be in [0, 1], got {self.min_share}")


def _kept(target_sizes: torch.Tensor, mask: torch.Tensor) -> float:
    return float((target_sizes.to(mask.device) * mask).sum())


def _exponents(points: int, spread: float) -> list[float]:
    if points == 1:
        return [1.0]
    return [spread ** (-1 + 2 * i / (points - 1)) for i in range(points)]


def _guess(kept: list[float], prior: list[float], target: float, min_weights: list[float]
           ) -> list[float]:
    """Per-layer kept weights between ``kept`` (now) and ``prior`` (the expected final
    allocation), geometric in between, that sum to ``target``: the centre of the profiles."""
    def at(e: float) -> list[float]:
        return [min(c, max(f, c ** (1 - e) * max(p, 1e-9) ** e))
                for c, p, f in zip(kept, prior, min_weights)]

    lo, hi = 0.0, 1.0
    if sum(at(hi)) > target:  # the prior keeps more than the target: go past it
        hi = 64.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(at(mid)) > target else (lo, mid)
    return at(hi)


def _prior(ctx: Context, min_weights: list[float]) -> list[float]:
    """The expected final allocation: the last transition's densities (warm start) rescaled to
    this budget, or the uniform one."""
    prev = ctx.state.get("densities") or {}
    if not all(t.fqn in prev for t in ctx.targets):
        return [ctx.density * t.num_weights for t in ctx.targets]
    base = [float(prev[t.fqn]) * t.num_weights for t in ctx.targets]
    caps = [float(t.num_weights) for t in ctx.targets]

    def at(scale: float) -> list[float]:
        return [min(c, max(f, scale * b)) for b, c, f in zip(base, caps, min_weights)]

    lo, hi = 0.0, 1.0
    while sum(at(hi)) < ctx.budget and hi < 1e12:
        hi *= 2
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(at(mid)) < ctx.budget else (lo, mid)
    return at(hi)


def _removed_mean(target: Any, mask: torch.Tensor, cut: torch.Tensor, mean: torch.Tensor
                  ) -> torch.Tensor:
    """``W_removed @ mean``: the mean contribution to the layer's output of the weights that
    ``cut`` removes from ``mask`` (``[out_features]``)."""
    gone = expand_groups(target, mask & ~cut)
    weight = target.weight.detach()
    return (weight * gone.to(weight.dtype)) @ mean


def _profiles(ctx: Context, masks: list[torch.Tensor], kept: list[float], guess: list[float],
              min_weights: list[float], batches: list[Any], cfg: LearnedConfig, round_: int
              ) -> tuple[list[list[tuple[float, float]]], JointCost, list[InputStats] | None]:
    """``(removed weights, loss increase)`` points of every layer, the others as they are; the
    joint check's measurement; and, with repair, the layers' input statistics.

    The loss increase of a cut is measured on ``batches`` and, with ``cfg.first_order`` off,
    its first-order part on the same batches, ``-sum_cut dL/dM``, is subtracted: at a trained
    model that part averages to zero but, measured on a few batches, it is mostly label noise
    (it grows like the cut, the rest like its square), which made small cuts look free or
    harmful at random.

    With ``cfg.repair`` (block granularity), a cut layer is measured with its kept weights
    refit to its old output (:func:`~adsparse.pruning.repair.repaired`), in the profiles and
    in the joint check, and nothing is subtracted: the refit keeps the output, so the cut's
    first-order part is gone with it, and what ``g * (W' - W)`` is left measures the refit
    itself (subtracted, it made cuts of a briefly trained layer look like gains and left a
    planted dead layer denser than half the live one). Otherwise, with ``cfg.compensate``, the
    joint cost of an allocation is measured with ``W_removed @ E[x]`` (``E[x]``: the layer's
    mean input on ``batches``) added to each layer's output; its one-layer profiles are not
    compensated: that flattened them so much that a duplicated branch kept more than half a
    live layer's density (the planted tests).
    """
    session = ctx.session
    proxies = session.proxies
    repair = cfg.repair and ctx.targets[0].block_size is not None
    compensate = cfg.compensate and not repair

    def loss() -> torch.Tensor:
        total = 0.0
        for i, batch in enumerate(batches):
            total = total + check_loss(ctx.loss_fn(session.model, batch), i, "learned profile")
        return total / len(batches)

    # The base loss of each batch and, by one backward, its gradient to every mask entry. With
    # repair or compensate, also the statistics of every layer's input (forward pre-hooks,
    # removed before anything else runs).
    base_per: list[float] = []
    grads_per: list[tuple[torch.Tensor, ...]] = []  # per batch, per layer: dL/dM
    stats = [InputStats(p.in_features, p.weight.device, second_moment=repair) for p in proxies]

    def recorder(layer: int) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            stats[layer].add(args[0])
        return hook

    hooks = [p.register_forward_pre_hook(recorder(i)) for i, p in enumerate(proxies)
             ] if (compensate or repair) else []
    try:
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                soft = []
                for proxy, m in zip(proxies, masks):
                    proxy.mask = m.to(proxy.weight.dtype).requires_grad_(True)
                    soft.append(proxy.mask)
                value = check_loss(ctx.loss_fn(session.model, batch), i, "learned profile")
                grads_per.append(tuple(g.detach() for g in torch.autograd.grad(value, soft)))
                base_per.append(float(value.detach()))
    finally:
        for h in hooks:
            h.remove()
    base = sum(base_per) / len(base_per)
    grads = [sum(g[layer] for g in grads_per) / len(grads_per) for layer in range(len(masks))]
    effective = [t.weight.detach() * expand_groups(t, m).to(t.weight.dtype)
                 for t, m in zip(ctx.targets, masks)] if repair else []  # what a refit fits

    refits: dict[tuple[int, bytes], tuple[torch.Tensor, torch.Tensor]] = {}

    def refit_key(layer: int, cut: torch.Tensor) -> tuple[int, bytes]:
        return layer, cut.cpu().numpy().tobytes()

    def prefetch(layer: int, cuts: list[torch.Tensor]) -> None:
        """Refit the cuts of ``layer`` not refit yet, together: the profile's points and the
        candidates' cuts of a layer each keep the top groups of one ranking, so they nest and
        share their factorizations (:func:`~adsparse.pruning.repair.repaired_nested`)."""
        if not repair:
            return
        todo = {refit_key(layer, c): c for c in cuts}
        todo = {k: c for k, c in todo.items() if k not in refits}
        if todo:
            fits = repaired_nested(effective[layer], list(todo.values()),
                                   ctx.targets[layer].block_size, stats[layer])
            refits.update(zip(todo, fits))

    def set_cut(layer: int, cut: torch.Tensor) -> float:
        """Cut layer ``layer`` to ``cut`` in its proxy; returns the first-order loss change of a
        raw cut on the measuring batches (0 for a refit, whose first order is not subtracted)."""
        proxy, target = proxies[layer], ctx.targets[layer]
        proxy.mask = cut.to(proxy.weight.dtype)
        if repair:
            key = refit_key(layer, cut)
            if key not in refits:  # (the callers refit many cuts at once before)
                prefetch(layer, [cut])
            proxy.override, proxy.shift = refits[key]
            return 0.0
        if compensate:
            proxy.shift = _removed_mean(target, masks[layer], cut,
                                        stats[layer].mean.to(proxy.weight.dtype))
        return -float(grads[layer].double()[masks[layer] & ~cut].sum())

    def reset(layer: int) -> None:
        proxy = proxies[layer]
        proxy.mask = masks[layer].to(proxy.weight.dtype)
        proxy.override = proxy.shift = None

    curves = []
    with torch.no_grad():
        for layer in range(len(proxies)):
            reset(layer)
        exps = _exponents(cfg.points, cfg.spread)
        for layer, t in enumerate(ctx.targets):
            c, g, least = kept[layer], guess[layer], min_weights[layer]
            ratio = min(max(g / c, 1e-9), 0.85) if c > 0 else 1.0
            wants = sorted({max(least, c * ratio ** a) for a in exps} | {least}, reverse=True)
            scores = ctx.scores(t)
            ranked = rank_groups([scores], [t.sizes], [masks[layer]])
            points = [(0.0, 0.0)]
            seen = {c}
            cuts = []
            for want in wants:
                cut = select_allocation([scores], [t.sizes], [want], [least],
                                        eligible=[masks[layer]], ranked=ranked)[0]
                x = _kept(t.sizes, cut)
                if x in seen or x > c:
                    continue
                seen.add(x)
                cuts.append((x, cut))
            prefetch(layer, [m for _, m in cuts])
            for x, cut in cuts:
                first = set_cut(layer, cut)
                if compensate:  # the one-layer profiles are not compensated (docstring)
                    proxies[layer].shift = None
                cost = float(loss()) - base
                if not cfg.first_order and not repair:
                    cost -= first
                points.append((c - x, cost))
            reset(layer)
            curves.append(points)
            ctx.history.append({"round": round_, "layer": t.fqn, "profile": points})

    @torch.no_grad()
    def joint_cost(allocations: list[list[torch.Tensor]]) -> list[list[float]]:
        """For each allocation (one mask per layer), per batch, the loss increase of cutting
        every layer at once to it.

        Uncorrected: between allocations of the same budget the first-order parts are of one
        size and partly cancel, and a model far from a minimum has a real first-order part
        (measured on the planted tests' briefly trained models); the noise that remains is
        handled by the paired comparison in :func:`run_learned`.
        """
        for layer in range(len(proxies)):
            prefetch(layer, [cut[layer] for cut in allocations])
        out = []
        for cut in allocations:
            for layer, m in enumerate(cut):
                set_cut(layer, m)
            per = []
            for i, batch in enumerate(batches):
                value = float(check_loss(ctx.loss_fn(session.model, batch), i, "learned profile"))
                per.append(value - base_per[i])
            for layer in range(len(cut)):
                reset(layer)
            out.append(per)
        return out

    return curves, joint_cost, (stats if repair else None)


def _rebalance(goal: list[float], target: float, min_weights: list[float], caps: list[float]
               ) -> list[float]:
    """``goal`` moved to sum to ``target`` (the candidates' whole-group rounding put back), in
    proportion to each layer's room, within ``[min_weights, caps]``."""
    goal = [min(c, max(f, g)) for g, f, c in zip(goal, min_weights, caps)]
    for _ in range(8):
        gap = target - sum(goal)
        room = [(c - g) if gap > 0 else (g - f) for g, f, c in zip(goal, min_weights, caps)]
        if abs(gap) < 1e-9 or sum(room) <= 0:
            break
        step = min(1.0, abs(gap) / sum(room))
        goal = [g + (1 if gap > 0 else -1) * step * r for g, r in zip(goal, room)]
    return goal


def _candidates(ctx: Context, masks: list[torch.Tensor], kept: list[float], knapsack: list[float],
                target: float, min_weights: list[float], curves: list[list[tuple[float, float]]],
                ranked: list[Ranked]) -> dict[str, list[float]]:
    """Per-layer kept weights of the allocations the round chooses from by measured loss: the
    knapsack optimum of the profiles, and the standard ones at the same cut (every layer by
    the same factor; one threshold on the scores; one on LAMP scores; halfway between the
    knapsack and the same factor), and the knapsack with no layer above 2x or 4x the same
    factor's cut (the sum of one-layer costs overrates cuts of layers in series, whose damage
    does not add up, and so can starve one of them to spare another). ``ranked``: the current
    scores ranked within ``masks``."""
    total = sum(kept)
    same = [k * target / total for k in kept] if total else list(kept)
    live = [ctx.scores(t) * m for t, m in zip(ctx.targets, masks)]
    out = {"knapsack": knapsack, "uniform": same}
    for name, keys, order in (("global", live, ranked),
                              ("lamp", [lamp_scores(k) for k in live], None)):
        cut = select_global(keys, ctx.sizes, target, min_weights, eligible=masks, ranked=order)
        out[name] = [_kept(t.sizes, m) for t, m in zip(ctx.targets, cut)]
    mix = [max(1e-9, a * b) ** 0.5 for a, b in zip(knapsack, same)]
    out["mix"] = _rebalance(mix, target, min_weights, kept)
    for factor in (2, 4):  # the knapsack, no layer above factor x the same-factor cut
        forced = [max(0.0, k - factor * s) for k, s in zip(kept, same)]
        room = sum(max(x for x, _ in c) for c in curves)
        removed = allocate_removal(curves, min(room, max(total - target, sum(forced))),
                                   share_ties=False, at_least=forced)
        out[f"cap{factor}"] = [k - d for k, d in zip(kept, removed)]
    return out


def run_learned(ctx: Context) -> list[torch.Tensor]:
    """The learned transition (module docstring); the final keep-masks, exactly on budget."""
    cfg: LearnedConfig = ctx.pruner.learned_config
    cfg.validate()
    targets = ctx.targets
    sizes = ctx.sizes
    # The pruner's min_weights, raised to min_share of the target density less one group: a
    # floor is met in whole groups (rounded up), so each floor then keeps less than 1/L weights
    # over its share and the L floors together stay within the budget at min_share 1. (With
    # +1 instead of +1/L, element floors each rounded up by a fraction and overshot it.)
    slack = 1.0 / len(targets)
    min_weights = [max(f, cfg.min_share * ctx.density * t.num_weights - float(t.sizes.max())
                       + slack) for f, t in zip(ctx.min_weights, targets)]
    total = float(sum(t.num_weights for t in targets))
    prior = _prior(ctx, min_weights)
    warm = all(t.fqn in (ctx.state.get("densities") or {}) for t in targets)
    if ctx.steps == 0 and warm:
        # No training and a warm start: the learned allocation itself, on the current scores.
        masks = select_allocation([ctx.scores(t) for t in targets], sizes, prior, min_weights)
        ctx.state["densities"] = {t.fqn: _kept(t.sizes, m) / t.num_weights
                                  for t, m in zip(targets, masks)}
        return masks
    masks = [torch.ones(t.grid, dtype=torch.bool, device=t.weight.device) for t in targets]
    kept = [_kept(t.sizes, m) for t, m in zip(targets, masks)]
    steps = ctx.steps
    batches_per_round = cfg.profile_batches
    rounds = 1 if steps == 0 else max(1, min(cfg.rounds, steps // cfg.round_steps))
    if steps:
        def per_round(b: int) -> int:  # forward-pass equivalents of one round
            return b * (3 + len(targets) * (cfg.points + 1) + (7 if cfg.candidates else 0))

        allowed = cfg.profile_budget * steps
        rounds = max(1, min(rounds, int(allowed // per_round(batches_per_round))))
    bounds = [round(k * steps / rounds) for k in range(rounds + 1)]
    chosen = []
    for r in range(rounds):
        t0, t1 = bounds[r], bounds[r + 1]
        last = r == rounds - 1
        target = ctx.budget if last else cubic_density(t1, steps, ctx.density) * total
        target = min(target, sum(kept))
        eval_batches = [next(ctx.batches) for _ in range(batches_per_round)]
        guess = _guess(kept, prior, target, min_weights)
        curves, joint_cost, stats = _profiles(ctx, masks, kept, guess, min_weights,
                                              eval_batches, cfg, r)
        # What the curves allow (each layer down to its min_weights, whole groups) bounds the cut.
        room = sum(max(x for x, _ in curve) for curve in curves)
        removed = allocate_removal(curves, min(room, max(0.0, sum(kept) - target)),
                                   share_ties=False)
        goal = [k - d for k, d in zip(kept, removed)]
        if cfg.candidates:
            costs = {}
            keys = [ctx.scores(t) for t in targets]
            ranked = rank_groups(keys, sizes, masks)
            wants = _candidates(ctx, masks, kept, goal, target, min_weights, curves, ranked)
            cuts = [select_allocation(keys, sizes, want, min_weights, eligible=masks,
                                      ranked=ranked) for want in wants.values()]
            for name, cut, per in zip(wants, cuts, joint_cost(cuts)):
                costs[name] = (sum(per) / len(per), [_kept(t.sizes, m) for t, m in
                                                     zip(targets, cut)], per)
            # Another allocation replaces the knapsack's only when it is cheaper by more than
            # the standard error of the paired per-batch differences (not by noise).
            knap = costs["knapsack"][2]
            best = "knapsack"
            for name, (_, _, per) in costs.items():
                diff = [a - b for a, b in zip(per, knap)]
                mean = sum(diff) / len(diff)
                var = sum((d - mean) ** 2 for d in diff) / max(1, len(diff) - 1)
                if mean + (var / len(diff)) ** 0.5 < 0 and (
                        best == "knapsack" or costs[name][0] < costs[best][0]):
                    best = name
            goal = _rebalance(costs[best][1], target, min_weights, kept)
            chosen.append(best)
            ctx.history.append({"round": r, "costs": {k: v[0] for k, v in costs.items()},
                                "kept": {k: v[1] for k, v in costs.items()}, "goal0": goal,
                                "chosen": best})
        start = kept
        # With realize, each mask update refits what it cut (block granularity; the round's
        # input statistics), and the masks move every realize_steps steps at most often.
        realizing = stats if cfg.realize else None
        every = max(cfg.update_every, cfg.realize_steps) if realizing else cfg.update_every
        before = masks
        d0 = cubic_density(t0, steps, ctx.density) if steps else 1.0
        d1 = cubic_density(t1, steps, ctx.density) if steps else ctx.density
        ahead = realizing is not None and cfg.cut_ahead
        for step in range(t0 + 1, t1 + 1):
            if ahead:  # update at an interval's first step, to where it ends
                update = (step - t0 - 1) % every == 0
                at = min(t1, step - 1 + every)
            else:
                update, at = step % every == 0 or step == t1, step
            phi = 1.0 if d0 == d1 else (d0 - cubic_density(at, steps, ctx.density)) / (d0 - d1)
            if update:
                want = [s + phi * (g - s) for s, g in zip(start, goal)]
                masks = select_allocation([ctx.scores(t) for t in targets], sizes, want,
                                          min_weights, eligible=masks)
                if realizing:
                    realize_(targets, before, masks, realizing)
                    before = masks
            loss = train_step(ctx, masks, step - 1, "learned transition")
            record = {"step": step - 1, "loss": loss, "round": r,
                      "density": sum(_kept(t.sizes, m) for t, m in zip(targets, masks)) / total}
            for t, m in zip(targets, masks):
                record[f"density/{t.fqn}"] = _kept(t.sizes, m) / t.num_weights
            ctx.history.append(record)
        masks = select_allocation([ctx.scores(t) for t in targets], sizes, goal, min_weights,
                                  eligible=None if steps == 0 else masks)
        kept = [_kept(t.sizes, m) for t, m in zip(targets, masks)]
    ctx.state["densities"] = {t.fqn: k / t.num_weights for t, k in zip(targets, kept)}
    ctx.state["chosen"] = chosen
    return masks
