"""Choosing which groups to keep across layers under one weight budget (DESIGN §5).

Every function here takes, per layer, a ranking key per group (larger = keep first) and the
number of real weights per group, and returns boolean keep-masks. The budget counts weights, not
groups, so a tail block holding fewer real weights costs less than a full one.

Exactness: the kept weights differ from the budget by at most half of the largest group
(the prefix of the ranking whose cumulative size is *closest* to the budget is kept), and each
layer keeps at least ``min_layer_density`` of its weights (its best-ranked groups, rounded up to
whole groups). A result that misses the budget by more than one group raises instead.
"""

from __future__ import annotations

import torch

__all__ = ["lamp_scores", "select_global", "select_uniform"]


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


def _ranked(key: torch.Tensor, sizes: torch.Tensor, eligible: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
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
                  min_weights: list[float], eligible: list[torch.Tensor] | None = None
                  ) -> list[torch.Tensor]:
    """One ranking over all layers' groups by ``keys``, cut where the kept weights meet ``budget``.

    Each layer first keeps its best groups up to ``min_weights[l]`` real weights; the rest of
    the budget goes to the best remaining groups of all layers. ``eligible`` (optional, per
    layer) restricts the groups that may be kept at all.
    """
    elig = eligible or [None] * len(keys)
    ranked = [_ranked(k, s, e) for k, s, e in zip(keys, sizes, elig)]
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
    """The same ``density`` in every layer, each layer keeping its best groups by ``keys``.

    A layer can only keep whole groups, so the rounding error of each layer is carried into the
    next one's target: the global total then stays within half a group of the budget, where
    rounding every layer independently could drift by one group per layer.
    """
    elig = eligible or [None] * len(keys)
    orders, counts, carry, kept, budget = [], [], 0.0, 0.0, 0.0
    for key, size, e, floor in zip(keys, sizes, elig, min_weights):
        order, csum = _ranked(key, size, e)
        want = density * float(size.sum()) + carry
        count = max(_closest(csum, want), _at_least(csum, floor))
        carry = want - float(csum[count])
        kept += float(csum[count])
        budget += density * float(size.sum())
        orders.append(order)
        counts.append(count)
    if eligible is None:
        _check_budget(kept, budget, sizes)
    return _to_masks(orders, counts, keys)
