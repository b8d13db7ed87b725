"""Choosing which groups to keep across layers under one weight budget (docs/pruning.md).

Every function here takes, per layer, a ranking key per group (larger = keep first) and the
number of real weights per group, and returns boolean keep-masks. The budget counts weights, not
groups, so a tail block holding fewer real weights costs less than a full one.

Exactness: the kept weights differ from the budget by at most half of the largest group
(the prefix of the ranking whose cumulative size is *closest* to the budget is kept), and each
layer keeps at least ``min_layer_density`` of its weights (its best-ranked groups, rounded up to
whole groups). A result that misses the budget by more than one group raises instead.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["Ranked", "allocate_removal", "lamp_scores", "lower_hull", "rank_groups",
           "select_allocation", "select_global", "select_uniform"]

Ranked = tuple[torch.Tensor, torch.Tensor]
"""One layer's eligible groups by descending key (flat indices) and their cumulative sizes."""


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al., 2021) of one layer's groups, from their importance ``scores``.

    With groups sorted by ascending score ``s``, group ``u`` gets
    ``s_u^2 / sum_{v >= u} s_v^2``: its share of the squared importance that remains once every
    less important group is gone. The best group of every layer scores 1, so one global
    threshold over LAMP scores never empties a layer. Ties are ranked by position.
    """
    flat = scores.detach().flatten().double().pow(2)
    order = torch.sort(flat, stable=True).indices
    ranked = flat[order]
    remaining = ranked.flip(0).cumsum(0).flip(0)
    lamp = torch.where(remaining > 0, ranked / remaining.clamp_min(1e-300),
                       torch.zeros((), dtype=ranked.dtype, device=ranked.device))
    out = torch.empty_like(flat)
    out[order] = lamp
    return out.view(scores.shape)


def _ranked(key: torch.Tensor, sizes: torch.Tensor, eligible: torch.Tensor | None) -> Ranked:
    """Flat indices of the eligible groups by descending key, and their cumulative sizes."""
    k = key.detach().flatten().double().cpu()
    if bool(torch.isnan(k).any()):
        raise ValueError("group scores contain NaN")
    idx = torch.arange(k.numel())
    if eligible is not None:
        idx = idx[eligible.flatten().cpu()]
    order = idx[torch.sort(k[idx], descending=True, stable=True).indices]
    csum = torch.cat([torch.zeros(1, dtype=torch.float64),
                      sizes.flatten().double().cpu()[order].cumsum(0)])
    return order, csum


def rank_groups(keys: list[torch.Tensor], sizes: list[torch.Tensor],
                eligible: list[torch.Tensor] | None = None) -> list[Ranked]:
    """Every layer's groups ranked once, for several :func:`select_allocation` calls on the same
    keys (``ranked=``): a ranking is a sort, the costliest part of a selection."""
    return [_ranked(k, s, e) for k, s, e in zip(keys, sizes, eligible or [None] * len(keys))]


def _at_least(csum: torch.Tensor, want: float) -> int:
    """Fewest leading groups whose cumulative size reaches ``want`` (all if it never does)."""
    if want <= 0:
        return 0
    tol = 1e-9 * max(1.0, want)
    k = int(torch.searchsorted(csum, torch.tensor([want - tol], dtype=csum.dtype)))
    return min(k, csum.numel() - 1)


def _closest(csum: torch.Tensor, want: float) -> int:
    """Number of leading groups whose cumulative size is closest to ``want`` (ties: fewer)."""
    return int(torch.argmin((csum - want).abs()))


def _to_masks(orders: list[torch.Tensor], counts: list[int], keys: list[torch.Tensor]
              ) -> list[torch.Tensor]:
    masks = []
    for order, count, key in zip(orders, counts, keys):
        m = torch.zeros(key.numel(), dtype=torch.bool)
        m[order[:count]] = True
        masks.append(m.view(key.shape).to(key.device))
    return masks


def _check_budget(kept: float, budget: float, sizes: list[torch.Tensor]) -> None:
    largest = max(float(s.max()) for s in sizes if s.numel())
    if abs(kept - budget) > largest + 1e-6:
        raise RuntimeError(f"pruning kept {kept:.0f} weights for a budget of {budget:.1f} "
                           f"(more than one group of {largest:.0f} away); this is a bug")


def select_global(keys: list[torch.Tensor], sizes: list[torch.Tensor], budget: float,
                  min_weights: list[float], eligible: list[torch.Tensor] | None = None,
                  ranked: list[Ranked] | None = None) -> list[torch.Tensor]:
    """One ranking over all layers' groups by ``keys``, cut where the kept weights meet ``budget``.

    Each layer first keeps its best groups up to ``min_weights[l]`` real weights; the rest of
    the budget goes to the best remaining groups of all layers. ``eligible`` (optional, per
    layer) restricts the groups that may be kept at all; ``ranked`` as in
    :func:`select_allocation`.
    """
    ranked = ranked or rank_groups(keys, sizes, eligible)
    orders = [o for o, _ in ranked]
    first = [_at_least(c, w) for (_, c), w in zip(ranked, min_weights)]
    mandatory = sum(float(c[n]) for (_, c), n in zip(ranked, first))
    largest = max(float(s.max()) for s in sizes if s.numel())
    if mandatory > budget + largest:
        raise ValueError(f"min_layer_density needs {mandatory:.0f} weights, more than the budget "
                         f"of {budget:.1f}: lower min_layer_density or raise the target density")
    rest_key, rest_size, rest_layer = [], [], []
    for layer, ((order, _), n, key, size) in enumerate(zip(ranked, first, keys, sizes)):
        tail = order[n:]
        rest_key.append(key.detach().flatten().double().cpu()[tail])
        rest_size.append(size.flatten().double().cpu()[tail])
        rest_layer.append(torch.full((tail.numel(),), layer, dtype=torch.int64))
    rk, rs, rl = torch.cat(rest_key), torch.cat(rest_size), torch.cat(rest_layer)
    glob = torch.sort(rk, descending=True, stable=True).indices
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), rs[glob].cumsum(0)])
    take = _closest(csum, budget - mandatory)
    extra = torch.bincount(rl[glob[:take]], minlength=len(keys))
    counts = [n + int(e) for n, e in zip(first, extra)]
    kept = sum(float(c[n]) for (_, c), n in zip(ranked, counts))
    if eligible is None:
        _check_budget(kept, budget, sizes)
    return _to_masks(orders, counts, keys)


def select_uniform(keys: list[torch.Tensor], sizes: list[torch.Tensor], density: float,
                   min_weights: list[float], eligible: list[torch.Tensor] | None = None
                   ) -> list[torch.Tensor]:
    """The same ``density`` in every layer, each layer keeping its best groups by ``keys``."""
    return select_allocation(keys, sizes, [density * float(s.sum()) for s in sizes], min_weights,
                             eligible)


def select_allocation(keys: list[torch.Tensor], sizes: list[torch.Tensor], want: list[float],
                      min_weights: list[float], eligible: list[torch.Tensor] | None = None,
                      ranked: list[Ranked] | None = None) -> list[torch.Tensor]:
    """Layer ``l`` keeps its best groups by ``keys`` up to about ``want[l]`` real weights.

    A layer can only keep whole groups, so the rounding error of each layer is carried into the
    next one's target: the global total then stays within half a group of ``sum(want)``, where
    rounding every layer independently could drift by one group per layer. Each layer keeps at
    least ``min_weights[l]``. ``ranked`` (from :func:`rank_groups` on the same ``keys``, ``sizes``
    and ``eligible``) skips the ranking.
    """
    ranked = ranked or rank_groups(keys, sizes, eligible)
    orders, csums, counts, carry, kept = [], [], [], 0.0, 0.0
    for (order, csum), least, w in zip(ranked, min_weights, want):
        target = w + carry
        count = max(_closest(csum, target), _at_least(csum, least))
        carry = target - float(csum[count])
        kept += float(csum[count])
        orders.append(order)
        csums.append(csum)
        counts.append(count)
    # The carry only flows forward: when the last layers are full (or at their minimum), put
    # what is left on any layer that can still take (give) its next (last) group.
    least_counts = [_at_least(c, f) for c, f in zip(csums, min_weights)]
    changed = True
    while changed:
        changed = False
        gap = sum(want) - kept
        for i, csum in enumerate(csums):
            n = counts[i]
            if gap > 0 and n < csum.numel() - 1:
                step = float(csum[n + 1] - csum[n])
                if abs(gap - step) < abs(gap):
                    counts[i], kept, gap, changed = n + 1, kept + step, gap - step, True
            elif gap < 0 and n > least_counts[i]:
                step = float(csum[n] - csum[n - 1])
                if abs(gap + step) < abs(gap):
                    counts[i], kept, gap, changed = n - 1, kept - step, gap + step, True
    if eligible is None:
        _check_budget(kept, sum(want), sizes)
    return _to_masks(orders, counts, keys)


def lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of ``(x, y)`` points sorted by increasing ``x`` (first point kept).

    Used on cost curves ``(removed weights, loss increase)``: along the hull the cost per removed
    weight never decreases, so removing weights in hull order is optimal for a piecewise-linear
    cost that interpolates the measured points.
    """
    pts = sorted(points)
    hull: list[tuple[float, float]] = []
    for x, y in pts:
        if hull and x == hull[-1][0]:
            if y >= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to (x, y)
            if (y1 - y0) * (x - x0) >= (y - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def allocate_removal(curves: list[list[tuple[float, float]]], removal: float,
                     share_ties: bool = True, at_least: list[float] | None = None
                     ) -> list[float]:
    """Split ``removal`` weights over layers at the least total cost (a greedy knapsack).

    ``curves[l]`` holds measured points ``(removed weights, cost)`` of layer ``l``, including
    ``(0, 0)``; the largest ``removed`` is all the layer may lose. Costs are interpolated
    linearly between points and replaced by their lower convex hull, whose segments are then
    taken cheapest cost per weight first over all layers: at the optimum every layer that
    loses weights does so at the same marginal cost per weight (the equal-slope condition of the
    Lagrangian), which this greedy meets exactly on the convexified curves. Segments of equal
    slope share the last part of the removal in proportion to their lengths, so layers with
    the same cost are cut alike (``share_ties``; otherwise the first layer's first).
    ``at_least[l]`` weights are removed from layer ``l`` whatever they cost (a cap on what it
    keeps). Returns the weights removed from each layer; they sum to ``removal``.
    """
    forced = list(at_least) if at_least is not None else [0.0] * len(curves)
    segments = []  # (slope, layer, length)
    total = 0.0
    for layer, points in enumerate(curves):
        hull = lower_hull(points)
        if hull[0][0] != 0.0:
            raise ValueError("every cost curve must start at 0 removed weights")
        forced[layer] = min(forced[layer], hull[-1][0])
        for (x0, y0), (x1, y1) in itertools.pairwise(hull):
            if x1 <= forced[layer]:
                continue
            if x0 < forced[layer]:  # the part beyond the forced removal, same slope
                y0 += (y1 - y0) * (forced[layer] - x0) / (x1 - x0)
                x0 = forced[layer]
            segments.append(((y1 - y0) / (x1 - x0), layer, x1 - x0))
            total += x1 - x0
    removal -= sum(forced)
    if removal < -1e-9 * max(1.0, sum(forced)):
        raise ValueError(f"the forced removals ({sum(forced):.1f}) exceed the removal")
    if removal > total * (1 + 1e-9) + 1e-9:
        raise ValueError(f"cannot remove {removal:.1f} weights, the curves allow {total:.1f}")
    segments.sort(key=lambda seg: seg[0])  # stable: a layer's segments stay in hull order
    out = list(forced)
    left = removal
    i = 0
    while left > 0 and i < len(segments):
        j = i
        while j < len(segments) and segments[j][0] == segments[i][0]:
            j += 1
        if not share_ties:
            j = i + 1
        level = sum(seg[2] for seg in segments[i:j])
        share = min(1.0, left / level)
        for _, layer, length in segments[i:j]:
            out[layer] += share * length
        left -= share * level
        i = j
    return out
