"""Click-prediction metrics: normalized entropy (NE), AUC and calibration.

Two ways to use them:

* the plain functions :func:`ne`, :func:`auc`, :func:`calibration`, :func:`logloss` on whole
  tensors (exact; AUC through average ranks, so ties count one half);
* accumulators for a stream: :class:`StreamingMetrics` (cumulative or per period, constant
  memory, AUC from fixed-bin histograms) and :class:`WindowedMetrics` (the last ``W`` samples
  or batches, exact, memory bounded by ``W``).

``preds`` are probabilities (after the sigmoid). They are clamped to ``[eps, 1 - eps]`` before
any logarithm so a confident wrong prediction costs a large but finite loss. All sums are kept
in float64: a day of a stream is millions of samples and float32 sums of log-losses drift.

NE follows TorchRec: ``NE = mean log-loss / H(p̄)`` where ``p̄`` is the mean label of the same
samples and ``H(p) = -p log p - (1-p) log(1-p)``; ``p̄`` is clamped to ``[eps, 1-eps]`` like the
predictions, so a window without a single click gets a large NE rather than a division by zero.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_EPS",
    "StreamingMetrics",
    "WindowedMetrics",
    "auc",
    "calibration",
    "logloss",
    "mean_ci",
    "ne",
    "relative_ne",
    "t95",
]

DEFAULT_EPS = 1e-7
METRIC_NAMES = ("ne", "auc", "calibration", "logloss", "count", "ctr")


def _prepare(labels: torch.Tensor, preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.as_tensor(labels).detach().reshape(-1).to("cpu", torch.float64)
    preds = torch.as_tensor(preds).detach().reshape(-1).to("cpu", torch.float64)
    if labels.numel() != preds.numel():
        raise ValueError(f"labels has {labels.numel()} elements but preds has {preds.numel()}")
    if labels.numel() and bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("labels must lie in [0, 1]")
    if preds.numel() and bool(torch.isnan(preds).any()):
        raise ValueError("preds contains NaN")
    return labels, preds


def _binary_entropy(p: float, eps: float) -> float:
    p = min(max(p, eps), 1.0 - eps)
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def _logloss_sum(labels: torch.Tensor, preds: torch.Tensor, eps: float) -> float:
    p = preds.clamp(eps, 1.0 - eps)
    return float(-(labels * p.log() + (1.0 - labels) * (-p).log1p()).sum())


def logloss(labels: torch.Tensor, preds: torch.Tensor, eps: float = DEFAULT_EPS) -> float:
    """Mean binary cross-entropy (natural log) of probabilities ``preds``; NaN when empty."""
    labels, preds = _prepare(labels, preds)
    if labels.numel() == 0:
        return math.nan
    return _logloss_sum(labels, preds, eps) / labels.numel()


def ne(labels: torch.Tensor, preds: torch.Tensor, eps: float = DEFAULT_EPS) -> float:
    """Normalized entropy: mean log-loss divided by the entropy of the mean label.

    1.0 is what always predicting the (true) mean CTR scores; lower is better.
    """
    labels, preds = _prepare(labels, preds)
    if labels.numel() == 0:
        return math.nan
    mean_loss = _logloss_sum(labels, preds, eps) / labels.numel()
    return mean_loss / _binary_entropy(float(labels.mean()), eps)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values``, ties sharing the mean of their ranks."""
    uniq, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    group_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0
    del uniq
    return group_rank[inverse]


def auc(labels: torch.Tensor, preds: torch.Tensor) -> float:
    """Area under the ROC curve (exact, ties count 1/2); NaN without both classes.

    Labels are thresholded at 0.5 (the stream's labels are 0/1).
    """
    labels, preds = _prepare(labels, preds)
    pos = labels > 0.5
    n_pos = int(pos.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(_average_ranks(preds)[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def calibration(labels: torch.Tensor, preds: torch.Tensor) -> float:
    """``sum(preds) / sum(labels)``: 1.0 is calibrated, >1 over-predicts; NaN without clicks."""
    labels, preds = _prepare(labels, preds)
    clicks = float(labels.sum())
    return float(preds.sum()) / clicks if clicks > 0 else math.nan


def relative_ne(ne_value: float, ne_reference: float) -> float:
    """Relative NE loss ``(NE - NE_ref) / NE_ref`` (positive = worse than the reference)."""
    return (ne_value - ne_reference) / ne_reference


# Two-sided 95% Student t quantiles by degrees of freedom (normal beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (the table's
    value at the largest tabulated df <= ``df``: conservative in between; NaN below 1)."""
    if df < 1:
        return math.nan
    known = [k for k in _T95 if k <= df]
    return _T95[max(known)] if df <= 30 else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean of the finite ``values`` and the half-width of its 95% t-interval (NaN half-width
    for fewer than 2 values): what the benchmarks report for paired differences over seeds."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, math.nan
    return m, t95(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))


class StreamingMetrics:
    """Accumulates NE, AUC, calibration and log-loss over any number of batches.

    Memory is constant: a few float64 sums plus two histograms of ``num_bins`` bins of the
    predictions of positive and of negative samples. AUC is computed from those histograms,
    treating predictions in the same bin as tied, so its resolution is the bin width
    ``1 / num_bins`` (default ``2**16`` bins: width 1.5e-5, 1 MiB). The error against the exact
    AUC is at most half the share of (positive, negative) pairs that fall in the same bin;
    for CTR-like predictions spread over 1e-3..0.5 it is below 1e-4. NE, log-loss, calibration,
    count and CTR are exact (up to float64 rounding).

    Use one instance cumulatively, or ``reset()`` it at each period end, or keep one per period
    and :meth:`merge` them.
    """

    def __init__(self, num_bins: int = 1 << 16, eps: float = DEFAULT_EPS) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.eps = float(eps)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.count = 0
        self.sum_labels = 0.0
        self.sum_preds = 0.0
        self.sum_logloss = 0.0
        self.pos_hist = torch.zeros(self.num_bins, dtype=torch.float64)
        self.neg_hist = torch.zeros(self.num_bins, dtype=torch.float64)

    def update(self, labels: torch.Tensor, preds: torch.Tensor) -> None:
        """Add a batch of 0/1 ``labels`` and probabilities ``preds`` (any shapes, same numel)."""
        labels, preds = _prepare(labels, preds)
        if labels.numel() == 0:
            return
        self.count += labels.numel()
        self.sum_labels += float(labels.sum())
        self.sum_preds += float(preds.sum())
        self.sum_logloss += _logloss_sum(labels, preds, self.eps)
        bins = (preds.clamp(0.0, 1.0) * self.num_bins).long().clamp_(max=self.num_bins - 1)
        pos = labels > 0.5
        self.pos_hist += torch.bincount(bins[pos], minlength=self.num_bins).to(torch.float64)
        self.neg_hist += torch.bincount(bins[~pos], minlength=self.num_bins).to(torch.float64)

    def merge(self, other: StreamingMetrics) -> StreamingMetrics:
        """Add ``other``'s samples to this accumulator (in place) and return ``self``."""
        if other.num_bins != self.num_bins or other.eps != self.eps:
            raise ValueError("can only merge StreamingMetrics with the same num_bins and eps")
        self.count += other.count
        self.sum_labels += other.sum_labels
        self.sum_preds += other.sum_preds
        self.sum_logloss += other.sum_logloss
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        return self

    def _auc(self) -> float:
        n_pos, n_neg = float(self.pos_hist.sum()), float(self.neg_hist.sum())
        if n_pos == 0 or n_neg == 0:
            return math.nan
        # Each positive beats every negative in a lower bin and ties (1/2) those in its own bin.
        neg_below = torch.cumsum(self.neg_hist, 0) - self.neg_hist
        wins = float((self.pos_hist * (neg_below + 0.5 * self.neg_hist)).sum())
        return wins / (n_pos * n_neg)

    def compute(self) -> dict[str, float]:
        """``{ne, auc, calibration, logloss, count, ctr}`` over everything seen (NaN if empty)."""
        if self.count == 0:
            return {name: (0 if name == "count" else math.nan) for name in METRIC_NAMES}
        ctr = self.sum_labels / self.count
        mean_loss = self.sum_logloss / self.count
        return {
            "ne": mean_loss / _binary_entropy(ctr, self.eps),
            "auc": self._auc(),
            "calibration": self.sum_preds / self.sum_labels if self.sum_labels > 0 else math.nan,
            "logloss": mean_loss,
            "count": self.count,
            "ctr": ctr,
        }

    def state_dict(self) -> dict:
        """Everything needed to resume accumulation (for checkpoints)."""
        return {
            "num_bins": self.num_bins, "eps": self.eps, "count": self.count,
            "sum_labels": self.sum_labels, "sum_preds": self.sum_preds,
            "sum_logloss": self.sum_logloss, "pos_hist": self.pos_hist.clone(),
            "neg_hist": self.neg_hist.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.num_bins, self.eps = int(state["num_bins"]), float(state["eps"])
        self.count = int(state["count"])
        self.sum_labels = float(state["sum_labels"])
        self.sum_preds = float(state["sum_preds"])
        self.sum_logloss = float(state["sum_logloss"])
        self.pos_hist = state["pos_hist"].to(torch.float64).clone()
        self.neg_hist = state["neg_hist"].to(torch.float64).clone()


class WindowedMetrics:
    """Metrics over the most recent ``window`` samples (``unit="samples"``) or batches.

    Keeps the raw (label, prediction) pairs of the window in a ring, so the metrics are exact
    (exact AUC) and memory is bounded by the window: ``window`` samples, or ``window`` batches.
    ``full`` says whether the window has filled up yet (early windows are shorter).
    """

    def __init__(self, window: int, unit: str = "samples", eps: float = DEFAULT_EPS) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if unit not in ("samples", "batches"):
            raise ValueError(f"unit must be 'samples' or 'batches', got {unit!r}")
        self.window = int(window)
        self.unit = unit
        self.eps = float(eps)
        self.reset()

    def reset(self) -> None:
        """Empty the window."""
        self._batches: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self._samples = 0
        self._seen = 0

    def update(self, labels: torch.Tensor, preds: torch.Tensor) -> None:
        """Push a batch; the oldest samples (or batches) fall out of the window."""
        labels, preds = _prepare(labels, preds)
        if labels.numel() == 0:
            return
        if self.unit == "samples" and labels.numel() > self.window:
            labels, preds = labels[-self.window:], preds[-self.window:]
        self._batches.append((labels, preds))
        self._samples += labels.numel()
        self._seen += 1 if self.unit == "batches" else labels.numel()
        if self.unit == "batches":
            while len(self._batches) > self.window:
                self._samples -= self._batches.popleft()[0].numel()
        else:
            while self._samples > self.window:
                old_l, old_p = self._batches[0]
                extra = self._samples - self.window
                if extra >= old_l.numel():
                    self._batches.popleft()
                    self._samples -= old_l.numel()
                else:
                    self._batches[0] = (old_l[extra:], old_p[extra:])
                    self._samples -= extra

    @property
    def full(self) -> bool:
        """Whether at least ``window`` samples/batches have been pushed since the last reset."""
        return self._seen >= self.window

    def __len__(self) -> int:
        """Samples currently in the window."""
        return self._samples

    def compute(self) -> dict[str, float]:
        """``{ne, auc, calibration, logloss, count, ctr}`` over the window (NaN if empty)."""
        if self._samples == 0:
            return {name: (0 if name == "count" else math.nan) for name in METRIC_NAMES}
        labels = torch.cat([b[0] for b in self._batches])
        preds = torch.cat([b[1] for b in self._batches])
        return {
            "ne": ne(labels, preds, self.eps),
            "auc": auc(labels, preds),
            "calibration": calibration(labels, preds),
            "logloss": logloss(labels, preds, self.eps),
            "count": labels.numel(),
            "ctr": float(labels.mean()),
        }
