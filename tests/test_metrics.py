"""NE, AUC and calibration against hand-computed values and float64 brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from adsparse.metrics import (
    StreamingMetrics,
    WindowedMetrics,
    auc,
    calibration,
    logloss,
    mean_ci,
    ne,
    relative_ne,
    t95,
)


def _random_ctr_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from the predictions themselves (so AUC is well above 0.5), CTR ~ 10%."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g, dtype=torch.float64) * 1.3 - 2.3
    preds = torch.sigmoid(logits)
    labels = (torch.rand(n, generator=g, dtype=torch.float64) < preds).to(torch.float64)
    return labels, preds


def _brute_auc(labels: torch.Tensor, preds: torch.Tensor) -> float:
    pos = preds[labels > 0.5].to(torch.float64)
    neg = preds[labels <= 0.5].to(torch.float64)
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def _reference_ne(labels: torch.Tensor, preds: torch.Tensor) -> float:
    # TorchRec's formula with log2 on both sides: the ratio is independent of the log base.
    y, p = labels.double(), preds.double()
    ce = -(y * torch.log2(p) + (1 - y) * torch.log2(1 - p)).sum()
    pbar = y.mean()
    norm = -(y.sum() * torch.log2(pbar) + (1 - y).sum() * torch.log2(1 - pbar))
    return float(ce / norm)


def test_hand_computed_values():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    preds = torch.tensor([0.9, 0.2, 0.6, 0.4])
    mean_loss = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.6)) / 4
    assert logloss(labels, preds) == pytest.approx(mean_loss, rel=1e-6)
    assert ne(labels, preds) == pytest.approx(mean_loss / math.log(2.0), rel=1e-6)
    assert auc(labels, preds) == 1.0
    assert calibration(labels, preds) == pytest.approx((0.9 + 0.2 + 0.6 + 0.4) / 2, rel=1e-6)


def test_auc_ties_count_half():
    # positives {0.3, 0.8, 0.1}, negatives {0.3, 0.1}: wins 0.3>0.1, 0.8>both, ties 0.3=0.3,
    # 0.1=0.1 -> (1 + 0.5 + 2 + 0.5) / 6.
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    preds = torch.tensor([0.3, 0.3, 0.8, 0.1, 0.1])
    assert auc(labels, preds) == pytest.approx(4.0 / 6.0)


def test_ne_of_constant_mean_prediction_is_one():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    preds = torch.full((7,), 2.0 / 7.0)
    assert ne(labels, preds) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("n,seed", [(1, 0), (37, 1), (999, 2)])
def test_functions_match_float64_references(n, seed):
    labels, preds = _random_ctr_data(n, seed)
    if 0 < labels.sum() < n:
        assert auc(labels, preds) == pytest.approx(_brute_auc(labels, preds), abs=1e-12)
        assert ne(labels, preds) == pytest.approx(_reference_ne(labels, preds), rel=1e-9)
        assert calibration(labels, preds) == pytest.approx(
            float(preds.sum() / labels.sum()), rel=1e-12)
    else:
        assert math.isnan(auc(labels, preds))


def test_float32_inputs_and_shapes():
    labels, preds = _random_ctr_data(501, 3)
    ref = ne(labels, preds)
    assert ne(labels.float().reshape(3, 167), preds.float().reshape(3, 167)) == pytest.approx(
        ref, rel=1e-5)


def test_clamping_keeps_losses_finite():
    labels = torch.tensor([1.0, 0.0, 1.0])
    preds = torch.tensor([0.0, 1.0, 1.0])
    value = logloss(labels, preds, eps=1e-7)
    assert math.isfinite(value)
    assert value == pytest.approx(-2 * math.log(1e-7) / 3 - math.log(1 - 1e-7) / 3, rel=1e-6)


def test_degenerate_inputs():
    assert math.isnan(ne(torch.tensor([]), torch.tensor([])))
    assert math.isnan(calibration(torch.zeros(4), torch.full((4,), 0.1)))
    # No clicks at all: H(p_bar) is clamped, so NE is large but finite (TorchRec's behaviour).
    assert math.isfinite(ne(torch.zeros(4), torch.full((4,), 0.1)))
    with pytest.raises(ValueError, match="elements"):
        ne(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        auc(torch.tensor([2.0, 0.0]), torch.tensor([0.1, 0.2]))
    assert relative_ne(1.01, 1.0) == pytest.approx(0.01)


def test_streaming_matches_batch_computation():
    labels, preds = _random_ctr_data(5003, 4)
    sm = StreamingMetrics()
    for chunk in torch.split(torch.arange(5003), 97):  # odd batch sizes, last one short
        sm.update(labels[chunk].float(), preds[chunk].float())
    got = sm.compute()
    assert got["count"] == 5003
    assert got["ctr"] == pytest.approx(float(labels.mean()), rel=1e-12)
    assert got["ne"] == pytest.approx(ne(labels, preds.float()), rel=1e-9)
    assert got["logloss"] == pytest.approx(logloss(labels, preds.float()), rel=1e-9)
    assert got["calibration"] == pytest.approx(calibration(labels, preds.float()), rel=1e-9)
    # AUC from 2**16 bins: ties only within a bin of width 1.5e-5.
    assert got["auc"] == pytest.approx(_brute_auc(labels, preds), abs=2e-4)


def test_streaming_auc_resolution_follows_num_bins():
    labels, preds = _random_ctr_data(3001, 5)
    exact = _brute_auc(labels, preds)
    coarse = StreamingMetrics(num_bins=4)
    coarse.update(labels, preds)
    fine = StreamingMetrics(num_bins=1 << 20)
    fine.update(labels, preds)
    assert abs(fine.compute()["auc"] - exact) < 1e-5
    assert abs(coarse.compute()["auc"] - exact) > abs(fine.compute()["auc"] - exact)


def test_merge_reset_and_state_dict():
    labels, preds = _random_ctr_data(2001, 6)
    whole, a, b = StreamingMetrics(), StreamingMetrics(), StreamingMetrics()
    whole.update(labels, preds)
    a.update(labels[:777], preds[:777])
    b.update(labels[777:], preds[777:])
    merged = a.merge(b).compute()
    for key, value in whole.compute().items():
        assert merged[key] == pytest.approx(value, rel=1e-12)
    restored = StreamingMetrics()
    restored.load_state_dict(whole.state_dict())
    assert restored.compute() == whole.compute()
    whole.reset()
    empty = whole.compute()
    assert empty["count"] == 0 and math.isnan(empty["ne"]) and math.isnan(empty["auc"])
    with pytest.raises(ValueError, match="num_bins"):
        a.merge(StreamingMetrics(num_bins=8))


def test_windowed_by_samples_is_exact_over_the_last_w():
    labels, preds = _random_ctr_data(1000, 7)
    win = WindowedMetrics(301)
    for chunk in torch.split(torch.arange(1000), 64):
        win.update(labels[chunk], preds[chunk])
    assert len(win) == 301 and win.full
    got = win.compute()
    tail_l, tail_p = labels[-301:], preds[-301:]
    assert got["ne"] == pytest.approx(ne(tail_l, tail_p), rel=1e-12)
    assert got["auc"] == pytest.approx(_brute_auc(tail_l, tail_p), abs=1e-12)
    assert got["count"] == 301
    # A single batch larger than the window keeps only its tail.
    win.reset()
    win.update(labels, preds)
    assert win.compute()["ne"] == pytest.approx(ne(tail_l, tail_p), rel=1e-12)


def test_windowed_by_batches():
    labels, preds = _random_ctr_data(900, 8)
    win = WindowedMetrics(3, unit="batches")
    chunks = list(torch.split(torch.arange(900), 100))
    win.update(labels[chunks[0]], preds[chunks[0]])
    assert not win.full
    for chunk in chunks[1:]:
        win.update(labels[chunk], preds[chunk])
    assert win.full and len(win) == 300
    assert win.compute()["auc"] == pytest.approx(_brute_auc(labels[600:], preds[600:]), abs=1e-12)
    with pytest.raises(ValueError):
        WindowedMetrics(0)
    with pytest.raises(ValueError):
        WindowedMetrics(5, unit="days")


def test_mean_ci_is_the_95_percent_t_interval():
    # 5 values: mean 3, sample sd sqrt(2.5), t(4) = 2.776.
    m, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    m, half = mean_ci([2.0, math.nan, 4.0, math.inf])  # non-finite values are left out
    assert m == 3.0 and half == pytest.approx(12.706 * math.sqrt(2.0) / math.sqrt(2))
    assert math.isnan(mean_ci([7.0])[1]) and mean_ci([7.0])[0] == 7.0
    assert all(math.isnan(x) for x in mean_ci([]))
    # Between tabulated degrees of freedom the next smaller one (wider interval); normal past 30.
    assert t95(11) == t95(10) == 2.228 and t95(31) == 1.96 and math.isnan(t95(0))
