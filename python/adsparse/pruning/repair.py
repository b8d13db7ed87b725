"""What a cut layer can still do: its kept weights refit by least squares to its old output.

``learned`` compares layers by how much the loss rises when each is cut. Measured with the kept
weights as they are, that is the damage of the cut *before any training*; but a transition
trains the kept weights at once, and the first thing training repairs is whatever the kept
inputs can still express of the removed ones. A layer whose inputs are redundant (correlated
units) loses little once repaired; a layer whose removed inputs carried information found
nowhere else keeps its damage. The refit measures that (docs/pruning.md, "Cuts measured after
what training repairs first"):

    W' = argmin_{W' = 0 outside S}  E || (x - mu) (W - W')^T ||^2 + ridge * || W - W' ||^2,
    shift = (W - W') mu

for the kept columns ``S`` of every row block (every row at element granularity), with the
mean ``mu`` and covariance of the layer's inputs on the measuring batches, so that the refit
layer's output ``x W'^T + b + shift`` matches the old one in mean and, as far as ``S`` allows,
in its variation. ``learned`` measures its block cuts with it (``LearnedConfig.repair``) and,
by default, applies it at every mask update of its transition (:func:`realize_`,
``LearnedConfig.realize``), so that the model is where the measurement assumed.
"""

from __future__ import annotations

from typing import Any

import torch

from adsparse.nn import expand_block_mask

__all__ = ["InputStats", "expand_groups", "realize_", "repaired", "repaired_nested"]

# Ridge of the refit, relative to the mean input variance: the fit uses the same two batches it
# is measured on, so an unregularized solve would overstate what ~500 rows can support. The
# DLRM benchmark's block NE was the same at 1e-2, 1e-1 and 1 (measured with an earlier form of
# the ridge that shrank W' to zero; docs/pruning.md).
RIDGE = 1e-2
BUCKET = 8  # row blocks solved together (see repaired)


class InputStats:
    """Running mean (and, with ``second_moment``, covariance) of a layer's inputs, in float64,
    fed by :meth:`add`. The refit needs the covariance; the mean compensation of element cuts
    only the mean, and skips the ``K x K`` product per batch."""

    def __init__(self, features: int, device: torch.device | str = "cpu",
                 second_moment: bool = True):
        self.rows = 0
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.outer = (torch.zeros(features, features, dtype=torch.float64, device=device)
                      if second_moment else None)
        self._system: torch.Tensor | None = None
        self._precision: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.rows += x.shape[0]
        self.sum += x.sum(0)
        if self.outer is not None:
            self.outer += x.T @ x
        self._system = self._precision = None

    def _system64(self) -> torch.Tensor:
        cov = self.cov
        return cov + torch.eye(len(cov), dtype=cov.dtype, device=cov.device) * (
            RIDGE * float(cov.diagonal().mean().clamp_min(1e-12)))

    @property
    def system(self) -> torch.Tensor:
        """``A = cov + ridge * I`` of the refit, in float32, what the solves use (cached until
        the next :meth:`add`)."""
        if self._system is None:
            self._system = self._system64().float()
        return self._system

    @property
    def precision(self) -> torch.Tensor:
        """``A^-1`` in float32, inverted in float64 (cached until the next :meth:`add`)."""
        if self._precision is None:
            self._precision = torch.cholesky_inverse(
                torch.linalg.cholesky(self._system64())).float()
        return self._precision

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.rows)

    @property
    def cov(self) -> torch.Tensor:
        if self.outer is None:
            raise ValueError("InputStats(second_moment=False) keeps no covariance")
        mu = self.mean
        return self.outer / max(1, self.rows) - torch.outer(mu, mu)


def _rows(a: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``a[order]`` (``[r, m, K]``) through one index_select (half the time of indexing)."""
    return a.index_select(0, order.flatten()).view(*order.shape, a.shape[1])


def _factor(a_rows: torch.Tensor, order: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Per row, the Cholesky factor ``L`` of ``a[o, o]`` (``a_rows``: ``a[o]``, ``[r, m, K]``)
    for its first ``size`` columns ``o`` of ``order`` (``[r, m]``), identity past them.

    ``L`` is lower triangular, so the factor of any shorter prefix is its leading block:
    forward substitution with ``L`` solves every prefix at once, and back substitution with
    ``L^T`` of a vector zero past a prefix solves that prefix alone (the zeros stay zero),
    which is how one factorization serves every nested set."""
    m = order.shape[1]
    valid = torch.arange(m, device=order.device)[None, :] < size[:, None]
    sub = torch.gather(a_rows, 2, order[:, None, :].expand(-1, m, -1))  # [r, m, m]
    sub = torch.where(valid[:, :, None] & valid[:, None, :], sub, 0.0)
    return torch.linalg.cholesky(sub + torch.diag_embed((~valid).to(sub.dtype)))


def repaired(weight: torch.Tensor, cut: torch.Tensor, block_size: tuple[int, int] | None,
             stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', shift)``: the weight ``weight`` ``[N, K]`` refit on the groups ``cut`` keeps
    (``cut``: a bool grid, ``[N/bn, K/bk]`` blocks or ``[N, K]`` elements) and the output shift
    ``(W - W') mu`` ``[N]`` that keeps the layer's mean output. ``W'`` is zero outside ``cut``.
    One cut of :func:`repaired_nested`, which says how."""
    return repaired_nested(weight, [cut], block_size, stats)[0]


def repaired_nested(weight: torch.Tensor, cuts: list[torch.Tensor],
                    block_size: tuple[int, int] | None, stats: InputStats
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`repaired` of each of ``cuts``, several cuts of one layer, sharing the work where
    their kept sets are nested (as the points of a layer's profile are: each keeps the top
    groups of one ranking); a cut that is not nested with the others is refit alone.

    Each row block's kept columns ``S`` and removed columns ``R`` (the rest of ``K``) give the
    same refit two ways: ``W'_S = W_S + A_SS^-1 A_SR W_R`` (a solve of size ``|S|``) or
    ``W' = W - P_:R P_RR^-1 W_R`` with ``P = A^-1`` (size ``|R|``, the optimal-brain-surgeon
    form), ``A = cov + ridge``; each row block takes the smaller, solved BUCKET at a time.
    Ordering a row block's columns by how many cuts keep them makes every cut's ``S`` a prefix
    of that order (and every ``R`` a prefix of the reverse), so one Cholesky factorization per
    row block and form, of the largest set any cut needs, serves all of them (the
    factorizations and the gathers of ``A`` were the refits' cost).
    The statistics are float64; the solves run in float32 (the ridge keeps the systems'
    condition below ~1e4: the refit is good to ~1e-4 relative, bounded against a float64
    reference in the tests).
    """
    n, k = weight.shape
    bn, bk = block_size or (1, 1)
    rows_b = cuts[0].shape[0]
    kept = torch.stack([c.repeat_interleave(bk, 1)[:, :k] for c in cuts])  # [P, row blocks, K]
    order = torch.argsort(-kept.sum(0), dim=1, stable=True)  # kept by more cuts first
    count = kept.sum(2)  # [P, row blocks]
    in_order = kept.gather(2, order[None].expand_as(kept))
    prefix = torch.arange(k, device=kept.device)[None, None, :] < count[:, :, None]
    nested = (in_order == prefix).flatten(1).all(1)
    if len(cuts) > 1 and not bool(nested.all()):
        alone = {i for i in range(len(cuts)) if not bool(nested[i])}
        rest = [c for i, c in enumerate(cuts) if i not in alone]
        together = iter(repaired_nested(weight, rest, block_size, stats) if rest else [])
        return [repaired_nested(weight, [c], block_size, stats)[0] if i in alone
                else next(together) for i, c in enumerate(cuts)]
    padded = torch.zeros(rows_b * bn, k, dtype=torch.float32, device=weight.device)
    padded[:n] = weight.detach()
    w_t = padded.reshape(rows_b, bn, k).transpose(1, 2)  # [R, K, bn]
    fits = [w_t.clone() for _ in cuts]
    # Row blocks that lose no weight keep theirs (W_R = 0): no solve.
    nonzero = w_t != 0
    changed = torch.stack([(nonzero & ~kp[:, :, None]).flatten(1).any(1) for kp in kept])
    small_s = count <= k - count
    for use_s in (True, False):
        uses = (small_s == use_s) & changed  # [P, R]: which cut solves which row block here
        sizes = torch.where(uses, count if use_s else k - count, 0)
        need = sizes.max(0).values  # the largest set each row block's factorization serves
        rows = torch.nonzero(need > 0).flatten()
        if len(rows) == 0:
            continue
        rows = rows[torch.argsort(need[rows], stable=True)]
        a = stats.system if use_s else stats.precision
        for chunk in rows.split(BUCKET):
            m = int(need[chunk].max())
            cols = order[chunk, :m] if use_s else order[chunk].flip(1)[:, :m]
            a_rows = _rows(a, cols)  # [r, m, K]
            factor = _factor(a_rows, cols, need[chunk])
            gather = cols[:, :, None].expand(-1, -1, bn)
            w = w_t[chunk]
            # S form: W'_S = A_SS^-1 (A W)_S, the same as W_S + A_SS^-1 A_SR W_R. OBS form:
            # P_RR^-1 W_R. Either way the forward half of the solve is shared by every cut.
            half = torch.linalg.solve_triangular(
                factor, a_rows @ w if use_s else torch.gather(w, 1, gather), upper=False)
            span = torch.arange(m, device=cols.device)[None, :, None]
            for p in range(len(cuts)):
                if not bool(uses[p, chunk].any()):
                    continue
                part = torch.where(span < sizes[p, chunk][:, None, None], half, 0.0)
                solved = torch.linalg.solve_triangular(factor.mT, part, upper=True)
                # S: past each row's |S| the solution is 0 (cut columns, masked below). OBS:
                # W' = W - P_:R P_RR^-1 W_R (P symmetric: P_:R = P_R:^T).
                fit = (w.scatter(1, gather, solved) if use_s
                       else w - a_rows.transpose(1, 2) @ solved)
                fits[p][chunk] = torch.where(uses[p, chunk][:, None, None], fit, fits[p][chunk])
    out = []
    for fit, kp in zip(fits, kept):
        fit = (fit * kp.to(fit.dtype)[:, :, None]).transpose(1, 2).reshape(rows_b * bn, k)[:n]
        shift = (padded[:n] - fit).double() @ stats.mean
        out.append((fit.to(weight.dtype), shift.to(weight.dtype)))
    return out


def expand_groups(target: Any, grid: torch.Tensor) -> torch.Tensor:
    """A group grid of a pruning target as the ``[N, K]`` grid of its weights."""
    if target.block_size is None:
        return grid
    return expand_block_mask(grid, target.block_size, tuple(target.weight.shape))


@torch.no_grad()
def realize_(targets: list[Any], before: list[torch.Tensor], after: list[torch.Tensor],
             stats: list[InputStats]) -> None:
    """Apply the refit to the weights, in place: every target whose mask went from ``before``
    to ``after`` gets its kept weights refit to the output it had under ``before`` and its bias
    shifted by the mean of what was cut (a layer without bias gets the refit alone). The cut
    weights keep their values (masked).

    (An optimal-brain-surgeon update per step, keeping each row block's inverse covariance on
    its kept columns and downdating it, was measured no cheaper: a step cuts 16-32 columns of
    most row blocks, and each downdate is ``K^2 |R|`` per row block.)
    """
    for t, old, new, st in zip(targets, before, after, stats):
        if bool((old == new).all()):
            continue
        weight = t.weight
        fit, shift = repaired(weight.detach() * expand_groups(t, old).to(weight.dtype), new,
                              t.block_size, st)
        keep = expand_groups(t, new)
        weight[keep] = fit[keep]
        if t.module.bias is not None:
            t.module.bias += shift
