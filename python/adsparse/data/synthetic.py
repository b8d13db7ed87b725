"""A seeded, non-stationary, Criteo-like click stream generated on the fly.

The clicks come from a known ("true") model that a DLRM can represent, and that model moves:

* **ID popularity shifts.** Each field draws IDs by a Zipf law over a ranking of its IDs; the
  ranking is re-sorted every period by scores that oscillate per ID, so yesterday's popular
  IDs fade and others rise. Within a period the ranking of period ``p`` blends into that of
  ``p + 1`` (each sample uses the next ranking with probability = its position in the period).
* **New IDs appear.** IDs arrive in index order: about half of each large table exists at the
  start, the rest arrive steadily over the stream, and fresh IDs get a popularity bonus that
  decays over a few periods. Table ``f`` never yields an ID ``>= embedding_sizes[f]``.
* **The click function drifts.** ``logit = b(t) + sum_f w_f(t) e_f[id_f](t)
  + sum_{(f,g) in pairs(regime)} c_fg <u_f[id_f](t), u_g[id_g](t)> + mlp_regime(t)(dense)``:
  per-ID effects ``e`` and latent factors ``u`` rotate slowly between two random tables, field
  weights ``w_f`` and the base rate ``b`` oscillate, and the dense MLP slides between two nets.
  The interacting pairs are drawn among mid-sized tables (65..6000 rows) whose IDs recur often
  enough for a model to learn their factors; about 30% of fields carry strong per-ID effects.
* **Drift knob.** ``drift="regimes"`` (default) is all of the above; ``"rewire"`` is the
  same with stronger regime changes: each regime's interactions are between fields of its own
  (disjoint pools) and 1.5x as strong, so the top-MLP inputs that matter move to other
  columns at every change (the default of ``adsparse run``); ``"slow"`` keeps the
  gradual drifts but has no regime changes; ``"none"`` is a stationary stream (a control: one
  regime, fixed per-ID truths, popularity, field weights, dense features and base rate, every
  ID present from the start).
* **Regime changes.** At a few periods (:attr:`regime_boundaries`) the set of interacting
  field pairs, the dense MLP, the dense feature distribution and the base rate all change at
  once, so the feature interactions that matter (and the best sparsity pattern) change.

ID 0 of every table is reserved for "missing" (some fields are missing for a share of samples,
like Criteo's empty columns). Dense features are ``log1p`` of log-normal counts, like Criteo's.

Everything derives from ``(seed, period, chunk)`` seeds, so ``period(p)`` is random-access and
the same seed yields bit-identical batches. Samples are produced in chunks of fixed size
(independent of ``batch_size``), so the data do not depend on the batch size either.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from adsparse.data.base import Batch

__all__ = ["CRITEO_LIKE_SIZES", "DRIFTS", "SyntheticCTRStream"]

DRIFTS = ("rewire", "regimes", "slow", "none")  # the stream's drift settings, most drift first

# Criteo Kaggle's 26 cardinalities, capped at 10k rows so the tables fit and the demo is fast.
CRITEO_LIKE_SIZES = [
    1460, 583, 10000, 10000, 305, 24, 10000, 633, 3, 10000, 5683, 10000, 3194,
    27, 10000, 10000, 10, 5652, 2173, 4, 10000, 18, 15, 10000, 105, 10000,
]

_CHUNK = 4096  # samples generated per RNG draw; fixed so data do not depend on batch_size
_LATENT = 4  # width of the true latent factors of the interactions
_DENSE_HIDDEN = 16
_SMALL_TABLE = 64  # tables this small exist whole from the start and are never missing
_MID_TABLE = 6000  # the largest tables that take part in the true interactions
_POOL_FIELDS = 6  # fields whose pairs the regimes' interactions are drawn from
_REWIRE_STRENGTH = 1.5  # "rewire": interactions this much stronger than in "regimes"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticCTRStream:
    """The default stream: ``num_periods`` periods of ``samples_per_period`` samples each.

    Args:
        num_periods: periods (think: days) in the stream.
        samples_per_period: samples per period; the last batch of a period may be shorter.
        seed: everything (the true model and the samples) derives from it.
        batch_size: samples per yielded :class:`Batch`.
        num_dense: dense features (Criteo: 13).
        embedding_sizes: rows of each table, one per categorical field; default
            :data:`CRITEO_LIKE_SIZES` (26 fields).
        regime_boundaries: first period of each regime after the first; default: three
            regimes of equal length (periods ``P//3`` and ``2P//3``).
        pairs_per_regime: interacting field pairs in each regime.
        initial_id_share: share of each large table's IDs that exist at period 0.
        base_ctr: range of the regimes' target click rates (one is drawn per regime; the
            base logit is solved for it at the start and end of every period, so the realised
            CTR follows the target up to a slow +-0.25 logit oscillation).
        drift: ``"regimes"``, ``"rewire"``, ``"slow"`` or ``"none"`` (module docstring).
    """

    def __init__(
        self,
        num_periods: int = 12,
        samples_per_period: int = 65536,
        seed: int = 0,
        batch_size: int = 256,
        num_dense: int = 13,
        embedding_sizes: Sequence[int] | None = None,
        regime_boundaries: Sequence[int] | None = None,
        pairs_per_regime: int = 4,
        initial_id_share: float = 0.5,
        base_ctr: tuple[float, float] = (0.05, 0.11),
        drift: str = "regimes",
    ) -> None:
        if drift not in DRIFTS:
            raise ValueError(f"drift must be one of {', '.join(DRIFTS)}, got {drift!r}")
        if num_periods < 1 or samples_per_period < 1 or batch_size < 1 or num_dense < 1:
            raise ValueError(
                "num_periods, samples_per_period, batch_size and num_dense must be >= 1"
            )
        sizes = list(CRITEO_LIKE_SIZES if embedding_sizes is None else embedding_sizes)
        if len(sizes) < 2 or min(sizes) < 2:
            raise ValueError(f"need >= 2 tables of >= 2 rows each, got {sizes}")
        if not 0.0 < initial_id_share <= 1.0:
            raise ValueError(f"initial_id_share must be in (0, 1], got {initial_id_share}")
        self._num_periods = int(num_periods)
        self.samples_per_period = int(samples_per_period)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_dense = int(num_dense)
        self.embedding_sizes = [int(n) for n in sizes]
        self.drift = drift
        # 1.0 where things move, 0.0 in the stationary control.
        self._moving = 0.0 if drift == "none" else 1.0
        if drift not in ("regimes", "rewire"):
            regime_boundaries = []
        elif regime_boundaries is None:
            cuts = {num_periods // 3, (2 * num_periods) // 3} - {0}
            regime_boundaries = sorted(cuts)
        self.regime_boundaries = sorted(int(b) for b in regime_boundaries)
        if any(b <= 0 or b >= num_periods for b in self.regime_boundaries):
            raise ValueError(f"regime_boundaries must lie in 1..{num_periods - 1}")
        self._build_truth(pairs_per_regime, initial_id_share if self._moving else 1.0, base_ctr)
        self._rankings: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._calibrate_base_rates()

    # ------------------------------------------------------------------ the true model
    def _build_truth(self, pairs_per_regime: int, initial_share: float,
                     base_ctr: tuple[float, float]) -> None:
        rng = np.random.default_rng([self.seed, 0])
        nf, nd, k = len(self.embedding_sizes), self.num_dense, _LATENT
        self.zipf_exponent = rng.uniform(1.2, 1.5, nf)
        self.missing_rate = np.where(rng.random(nf) < 0.25, rng.uniform(0.05, 0.2, nf), 0.0)
        self.field_weight = np.abs(np.where(rng.random(nf) < 0.3, rng.normal(0.4, 0.1, nf), 0.05))
        self._weight_phase = rng.uniform(0, 2 * math.pi, nf)
        self._effects, self._factors, self._pop = [], [], []
        self._arrival, self._zipf_cdf, self._initial_ids = [], [], []
        for f, n in enumerate(self.embedding_sizes):
            small = n <= _SMALL_TABLE
            if small:
                self.missing_rate[f] = 0.0
            eff = rng.normal(0.0, 1.0, (2, n)).astype(np.float32)
            fac = rng.normal(0.0, 1.0 / math.sqrt(k), (2, n, k)).astype(np.float32)
            eff[:, 0] = 0.0  # the "missing" ID carries no signal
            fac[:, 0] = 0.0
            self._effects.append(eff)
            self._factors.append(fac)
            self._pop.append((rng.normal(0.0, 1.0, n), rng.uniform(0.15, 0.6, n),
                              rng.uniform(0, 2 * math.pi, n)))
            n0 = n - 1 if small else max(1, round(initial_share * (n - 1)))
            self._initial_ids.append(n0)
            # ID i (1-based) arrives at period (i - n0) / rate; the last one just before the end.
            arrival = np.zeros(n)
            arrival[n0 + 1:] = (np.arange(n0 + 1, n) - n0) / max(1, n - 1 - n0) * (
                self._num_periods - 1)
            arrival[0] = np.inf  # never drawn by the ranking; "missing" is drawn separately
            self._arrival.append(arrival)
            weights = np.arange(1, n, dtype=np.float64) ** -self.zipf_exponent[f]
            self._zipf_cdf.append(np.cumsum(weights))
        self.num_regimes = len(self.regime_boundaries) + 1
        self._regime_pairs, self._pair_strength = [], []
        # Interactions live between mid-sized tables (think site category x user segment):
        # their IDs recur often enough within a period for a model to learn their factors. Every
        # regime draws its pairs from one pool of fields, so a regime change re-wires which
        # pairwise interactions (MLP inputs) matter while the fields' latent factors stay: a
        # dense model re-weights inputs it already computes, a pruned one may have cut them.
        mid = [f for f, n in enumerate(self.embedding_sizes) if _SMALL_TABLE < n <= _MID_TABLE]
        if len(mid) < _POOL_FIELDS:
            mid = list(range(nf))
        # "rewire": every regime has a pool of its own (disjoint while there are fields enough),
        # so a change moves the interactions that matter to inputs the last regime did not use.
        if self.drift == "rewire":
            order = rng.permutation(mid).tolist()
            size = min(_POOL_FIELDS, len(order))
            pools = [sorted(order[(r * size + i) % len(order)] for i in range(size))
                     for r in range(self.num_regimes)]
            strength = _REWIRE_STRENGTH
        else:
            shared = sorted(rng.choice(mid, size=min(_POOL_FIELDS, len(mid)),
                                       replace=False).tolist())
            pools, strength = [shared] * self.num_regimes, 1.0
        for pool in pools:
            candidates = [(f, g) for i, f in enumerate(pool) for g in pool[i + 1:]]
            pick = rng.choice(len(candidates), size=min(pairs_per_regime, len(candidates)),
                              replace=False)
            self._regime_pairs.append([candidates[i] for i in sorted(pick)])
            self._pair_strength.append(strength * rng.uniform(0.8, 1.2, len(pick))
                                       * rng.choice([-1.0, 1.0], len(pick)))
        lo, hi = base_ctr
        self._target_ctr = rng.uniform(lo, hi, self.num_regimes)
        self._dense_mean = rng.normal(1.5, 0.6, (self.num_regimes, nd))
        self._dense_scale = rng.uniform(0.6, 1.2, nd)
        mix = rng.normal(0.0, 0.4, (nd, nd)) + np.eye(nd)
        self._dense_mix = mix / np.linalg.norm(mix, axis=0, keepdims=True)
        self._dense_phase = rng.uniform(0, 2 * math.pi, nd)
        # Two random nets per regime; the regime's net slides from one to the other.
        self._nets = [
            [(rng.normal(0, 1 / math.sqrt(nd), (nd, _DENSE_HIDDEN)),
              rng.normal(0, 0.5, _DENSE_HIDDEN),
              rng.normal(0, 1.5 / math.sqrt(_DENSE_HIDDEN), _DENSE_HIDDEN)) for _ in range(2)]
            for _ in range(self.num_regimes)
        ]

    def _calibrate_base_rates(self) -> None:
        # The other terms of the logit spread it widely (pulling the mean CTR towards 0.5) and
        # shift its mean as they drift; so solve, at the start and at the end of every period,
        # for the base logit that gives the period's regime its target CTR, and interpolate in
        # between. The CTR then moves only by the explicit base-rate oscillation (+-0.25 logit)
        # and jumps at regime changes.
        self._base_logit = np.zeros((self.num_periods, 2))
        for p in range(self.num_periods):
            regime = self.regime_of(p)
            for end in (0, 1):
                rng = np.random.default_rng([self.seed, 2, p, end])
                frac = np.full(1024, float(end))
                sparse = self._draw_ids(rng, p, frac)
                dense = self._dense_features(rng, regime, p + frac)
                rest = self._logits(regime, p + frac, dense, sparse)
                lo, hi = -12.0, 12.0
                for _ in range(30):  # bisection: the mean CTR increases with the base logit
                    mid = 0.5 * (lo + hi)
                    if _sigmoid(rest + mid).mean() < self._target_ctr[regime]:
                        lo = mid
                    else:
                        hi = mid
                self._base_logit[p, end] = 0.5 * (lo + hi)

    # ------------------------------------------------------------------ public helpers
    @property
    def num_periods(self) -> int:
        return self._num_periods

    @property
    def num_sparse(self) -> int:
        return len(self.embedding_sizes)

    def regime_of(self, p: int) -> int:
        """Index of the regime that period ``p`` belongs to (0 for the first)."""
        self._check_period(p)
        return sum(1 for b in self.regime_boundaries if p >= b)

    def interaction_pairs(self, p: int) -> list[tuple[int, int]]:
        """The field pairs ``(f, g)`` whose latent interaction drives clicks in period ``p``."""
        return list(self._regime_pairs[self.regime_of(p)])

    def available_ids(self, f: int, t: float) -> int:
        """How many real IDs (``1..n``) table ``f`` has at (fractional) period ``t``."""
        # arrival[1:] is non-decreasing (IDs arrive in index order); arrival[0] is "missing".
        return int(np.searchsorted(self._arrival[f][1:], t, side="right"))

    def latent_factors(self, f: int, ids: torch.Tensor, t: float) -> torch.Tensor:
        """The true latent factors ``[len(ids), 4]`` of IDs ``ids`` of field ``f`` at time ``t``.

        Exposed for tests and analysis (e.g. to check which interactions drive the labels).
        """
        angle = self._angle(np.full(1, t))[0]
        fac = self._factors[f]
        ids_np = ids.detach().cpu().numpy()
        return torch.from_numpy(np.cos(angle) * fac[0, ids_np] + np.sin(angle) * fac[1, ids_np])

    def __len__(self) -> int:
        """Batches per period."""
        return math.ceil(self.samples_per_period / self.batch_size)

    def __repr__(self) -> str:
        return (f"SyntheticCTRStream(num_periods={self.num_periods}, samples_per_period="
                f"{self.samples_per_period}, seed={self.seed}, batch_size={self.batch_size}, "
                f"tables={self.num_sparse}, drift={self.drift!r}, "
                f"regime_boundaries={self.regime_boundaries})")

    # ------------------------------------------------------------------ generation
    def _check_period(self, p: int) -> None:
        if not 0 <= p < self._num_periods:
            raise IndexError(f"period {p} out of range [0, {self._num_periods})")

    def _angle(self, t: np.ndarray) -> np.ndarray:
        # Slow rotation of per-ID truths: ~1 radian over 8 periods.
        return 0.12 * self._moving * t

    def _ranking(self, q: int) -> list[np.ndarray]:
        """Per field, the IDs that exist at period ``q`` sorted by popularity (most first)."""
        if q in self._rankings:
            self._rankings.move_to_end(q)
            return self._rankings[q]
        out = []
        for f in range(self.num_sparse):
            base, freq, phase = self._pop[f]
            arrival = self._arrival[f]
            ids = np.nonzero(arrival <= q)[0]
            age = q - arrival[ids]
            fresh = np.where(self._initial_ids[f] < ids, 1.5 * np.exp(-age / 2.0), 0.0)
            score = base[ids] + 0.5 * np.sin(freq[ids] * q + phase[ids]) + fresh
            out.append(ids[np.argsort(-score, kind="stable")])
        self._rankings[q] = out
        while len(self._rankings) > 4:
            self._rankings.popitem(last=False)
        return out

    def _draw_ids(self, rng: np.random.Generator, p: int, frac: np.ndarray) -> np.ndarray:
        m = frac.shape[0]
        q = p if self._moving else 0  # the stationary control keeps the first ranking
        now, nxt = self._ranking(q), self._ranking(q + int(self._moving))
        use_next = rng.random(m) < frac
        sparse = np.empty((m, self.num_sparse), dtype=np.int64)
        for f in range(self.num_sparse):
            u = rng.random(m)
            cdf = self._zipf_cdf[f]
            ids = np.empty(m, dtype=np.int64)
            for ranking, sel in ((now[f], ~use_next), (nxt[f], use_next)):
                ranks = np.searchsorted(cdf, u[sel] * cdf[len(ranking) - 1], side="right")
                ids[sel] = ranking[np.minimum(ranks, len(ranking) - 1)]
            if self.missing_rate[f] > 0:
                ids[rng.random(m) < self.missing_rate[f]] = 0
            sparse[:, f] = ids
        return sparse

    def _dense_features(self, rng: np.random.Generator, regime: int,
                        t: np.ndarray) -> np.ndarray:
        m = t.shape[0]
        z = rng.standard_normal((m, self.num_dense)) @ self._dense_mix
        mu = self._dense_mean[regime] + 0.3 * self._moving * np.sin(2 * math.pi * t[:, None] / 8.0
                                                      + self._dense_phase)
        counts = np.floor(np.exp(mu + self._dense_scale * z))
        counts[rng.random((m, self.num_dense)) < 0.05] = 0.0  # missing counts, like Criteo
        return np.log1p(counts)

    def _logits(self, regime: int, t: np.ndarray, dense: np.ndarray,
                sparse: np.ndarray) -> np.ndarray:
        angle = self._angle(t)
        cos, sin = np.cos(angle), np.sin(angle)
        logit = np.zeros_like(t)
        for f in range(self.num_sparse):
            ids = sparse[:, f]
            eff = cos * self._effects[f][0, ids] + sin * self._effects[f][1, ids]
            weight = self.field_weight[f] * (1 + 0.3 * self._moving * np.sin(2 * math.pi * t / 5.0
                                                              + self._weight_phase[f]))
            logit = logit + weight * eff
        for (f, g), strength in zip(self._regime_pairs[regime], self._pair_strength[regime]):
            uf = cos[:, None] * self._factors[f][0, sparse[:, f]] \
                + sin[:, None] * self._factors[f][1, sparse[:, f]]
            ug = cos[:, None] * self._factors[g][0, sparse[:, g]] \
                + sin[:, None] * self._factors[g][1, sparse[:, g]]
            logit = logit + strength * (uf * ug).sum(1)
        # Dense MLP: slides from net A to net B of the regime as time passes.
        x = (dense - 1.5) / 1.2
        mix = (0.5 - 0.5 * np.cos(2 * math.pi * t / max(2.0, self.num_periods / 2))) * self._moving
        for net, share in zip(self._nets[regime], (1 - mix, mix)):
            w1, b1, w2 = net
            logit = logit + share * (np.tanh(x @ w1 + b1) @ w2)
        return logit

    def _chunk(self, p: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Chunk ``c`` of period ``p``: (dense, sparse, labels, true logits) as numpy arrays."""
        start = c * _CHUNK
        m = min(_CHUNK, self.samples_per_period - start)
        rng = np.random.default_rng([self.seed, 1, p, c])
        frac = (start + np.arange(m)) / self.samples_per_period
        t = p + frac
        regime = self.regime_of(p)
        sparse = self._draw_ids(rng, p, frac)
        dense = self._dense_features(rng, regime, t)
        base = self._base_logit[p, 0] * (1 - frac) + self._base_logit[p, 1] * frac
        base = base + 0.25 * self._moving * np.sin(2 * math.pi * t / 6.0)
        logits = base + self._logits(regime, t, dense, sparse)
        labels = (rng.random(m) < _sigmoid(logits)).astype(np.float32)
        return dense.astype(np.float32), sparse, labels, logits

    def true_logits(self, p: int) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Like :meth:`period` but also yields the true click logits of each batch.

        The Bayes-optimal predictor is ``sigmoid(true logits)``: its NE is the floor that no
        model can beat on this period (useful to judge how much a model has learned).
        """
        yield from self._batches(p, with_logits=True)

    def period(self, p: int) -> Iterator[Batch]:
        """The mini-batches of period ``p`` (deterministic, any ``p`` in any order)."""
        for batch, _ in self._batches(p, with_logits=False):
            yield batch

    def _batches(self, p: int, with_logits: bool) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        self._check_period(p)
        num_chunks = math.ceil(self.samples_per_period / _CHUNK)
        pending: list[tuple[np.ndarray, ...]] = []
        pending_rows = 0
        for c in range(num_chunks):
            pending.append(self._chunk(p, c))
            pending_rows += pending[-1][0].shape[0]
            last = c == num_chunks - 1
            if pending_rows < self.batch_size and not last:
                continue
            dense, sparse, labels, logits = (np.concatenate(parts) for parts in zip(*pending))
            usable = pending_rows if last else pending_rows - pending_rows % self.batch_size
            for s in range(0, usable, self.batch_size):
                e = min(s + self.batch_size, usable)
                batch = Batch(torch.from_numpy(dense[s:e].copy()),
                              torch.from_numpy(sparse[s:e].copy()),
                              torch.from_numpy(labels[s:e].copy()))
                yield batch, (torch.from_numpy(logits[s:e].copy()) if with_logits else None)
            rest = slice(usable, pending_rows)
            pending = [(dense[rest], sparse[rest], labels[rest], logits[rest])]
            pending_rows -= usable
