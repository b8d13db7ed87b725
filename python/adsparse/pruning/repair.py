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

__all__ = ["InputStats", "expand_groups", "realize_", "repaired"]

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


def _padded(sets: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of each row's set (``sets``: bool ``[r, K]``) first, padded to ``m``, and
    which of them are real."""
    order = torch.argsort((~sets).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=sets.device)[None, :] < sets.sum(1)[:, None]
    return order, valid


def _rows(a: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``a[order]`` (``[r, m, K]``) through one index_select (half the time of indexing)."""
    return a.index_select(0, order.flatten()).view(*order.shape, a.shape[1])


def _solve(a: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, rhs: torch.Tensor
           ) -> torch.Tensor:
    """``a[set, set]^-1 rhs`` for every row's set (padding solves identity rows, gives 0)."""
    m = order.shape[1]
    sub = torch.gather(_rows(a, order), 2, order[:, None, :].expand(-1, m, -1))  # [r, m, m]
    sub = torch.where(valid[:, :, None] & valid[:, None, :], sub, 0.0)
    sub = sub + torch.diag_embed((~valid).to(sub.dtype))
    rhs = torch.where(valid[:, :, None], rhs, 0.0)
    return torch.where(valid[:, :, None],
                       torch.cholesky_solve(rhs, torch.linalg.cholesky(sub)), 0.0)


def repaired(weight: torch.Tensor, cut: torch.Tensor, block_size: tuple[int, int] | None,
             stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', shift)``: the weight ``weight`` ``[N, K]`` refit on the groups ``cut`` keeps
    (``cut``: a bool grid, ``[N/bn, K/bk]`` blocks or ``[N, K]`` elements) and the output shift
    ``(W - W') mu`` ``[N]`` that keeps the layer's mean output. ``W'`` is zero outside ``cut``.

    Each row block's kept columns ``S`` and removed columns ``R`` (the rest of ``K``) give the
    same refit two ways: ``W'_S = W_S + A_SS^-1 A_SR W_R`` (a solve of size ``|S|``) or
    ``W' = W - P_:R P_RR^-1 W_R`` with ``P = A^-1`` (size ``|R|``, the optimal-brain-surgeon
    form), ``A = cov + ridge``; each row block takes the smaller, solved BUCKET at a time.
    The statistics are float64; the solves run in float32 (the gathers and factorizations are
    the cost, and the ridge keeps the systems' condition below ~1e4: the refit is good to
    ~1e-4 relative, bounded against a float64 reference in the tests).
    """
    n, k = weight.shape
    bn, bk = block_size or (1, 1)
    rows_b = cut.shape[0]
    a = stats.system
    kept = cut.repeat_interleave(bk, 1)[:, :k]  # [row blocks, K]
    padded = torch.zeros(rows_b * bn, k, dtype=torch.float32, device=weight.device)
    padded[:n] = weight.detach()
    w_t = padded.reshape(rows_b, bn, k).transpose(1, 2)  # [R, K, bn]
    fit = w_t.clone()
    count = kept.sum(1)
    small_s = count <= k - count
    # Row blocks that lose no weight keep theirs (W_R = 0): no solve.
    changed = ((w_t != 0) & ~kept[:, :, None]).flatten(1).any(1)
    for use_s in (True, False):
        rows = torch.nonzero((small_s == use_s) & changed).flatten()
        if len(rows) == 0:
            continue
        sizes = count[rows] if use_s else k - count[rows]
        rows = rows[torch.argsort(sizes, stable=True)]
        for chunk in rows.split(BUCKET):
            sets = kept[chunk] if use_s else ~kept[chunk]
            m = int(sets.sum(1).max())
            if m == 0:
                continue
            order, valid = _padded(sets, m)
            w_r = w_t[chunk] * (~kept[chunk]).to(w_t.dtype)[:, :, None]  # W_R, zero elsewhere
            gather = order[:, :, None].expand(-1, -1, bn)
            if use_s:  # W'_S = W_S + A_SS^-1 A_SR W_R
                delta = _solve(a, order, valid, _rows(a, order) @ w_r)
                fit[chunk] = fit[chunk].scatter_add(1, gather, delta)
            else:  # W' = W - P_:R P_RR^-1 W_R  (P symmetric: P_:R = P_R:^T)
                precision = stats.precision
                inner = _solve(precision, order, valid, torch.gather(w_r, 1, gather))
                p_r = _rows(precision, order) * valid[:, :, None]  # [r, m, K]
                fit[chunk] = fit[chunk] - p_r.transpose(1, 2) @ inner
    fit = fit * kept.to(fit.dtype)[:, :, None]
    out = fit.transpose(1, 2).reshape(rows_b * bn, k)[:n]
    shift = (padded[:n] - out).double() @ stats.mean
    return out.to(weight.dtype), shift.to(weight.dtype)


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
