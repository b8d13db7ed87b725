"""The online paradigms on tiny streams: schedules, progressive validation, resume, 2 ranks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from adsparse.data import SyntheticCTRStream
from adsparse.layout import BlockSparseWeight
from adsparse.metrics import StreamingMetrics, ne
from adsparse.models import DLRM
from adsparse.nn import BlockSparseLinear, sparsify_
from adsparse.online import (
    Experiment,
    OnlineConfig,
    OnlineTrainer,
    default_components,
    parse_strategies,
    run_experiment,
)
from adsparse.online.checkpoint import load_checkpoint, save_checkpoint
from adsparse.online.distributed import DistContext
from adsparse.online.regeneration import carry_adam_state
from adsparse.online.strategies import AD2SStrategy, D2SStrategy, DenseTrack
from adsparse.pruning import permute_like, sort_units_

TINY_MODEL = {"embedding_dim": 8, "bottom_mlp": [32, 8], "top_mlp": [48, 16, 1]}
SIZES = [50, 7, 90, 30, 3, 64, 20, 11]


def tiny_stream(periods: int = 4, samples: int = 384, seed: int = 3) -> SyntheticCTRStream:
    return SyntheticCTRStream(num_periods=periods, samples_per_period=samples, seed=seed,
                              batch_size=64, embedding_sizes=SIZES)


def tiny_cfg(**kw) -> OnlineConfig:
    base = {"density": 0.3, "block_size": (8, 8), "prune_steps": 3, "buffer_batches": 4,
            "window_batches": 2, "lr": 3e-3}
    base.update(kw)
    return OnlineConfig(**base)


def trainer(stream, cfg, **kw) -> OnlineTrainer:
    comps = default_components(stream.num_dense, stream.embedding_sizes, seed=cfg.seed,
                               model=TINY_MODEL)
    return OnlineTrainer(stream, cfg, comps, progress=False, **kw)


def test_all_strategies_one_pass():
    stream = tiny_stream()
    cfg = tiny_cfg(strategies=["prune_once", "d2s", "d2s:r=2", "ad2s"], min_interval=1)
    seen: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    labels: dict[tuple[int, int], torch.Tensor] = {}

    def hook(p, i, batch, preds):
        seen[(p, i)] = {k: v.clone() for k, v in preds.items()}
        labels[(p, i)] = batch.labels.clone()

    t = trainer(stream, cfg, on_batch=hook)
    res = t.run()
    strat = res["strategies"]
    assert list(strat) == ["dense", "prune_once", "d2s", "d2s:r=2", "ad2s"]  # dense added
    # Every strategy saw the same batches (same labels, same order), every period recorded.
    assert len(seen) == 4 * 6
    for name, s in strat.items():
        assert [r["period"] for r in s["periods"]] == [0, 1, 2, 3]
        # The recorded period NE is the NE of the predictions the strategy served.
        for r in s["periods"]:
            keys = sorted(k for k in seen if k[0] == r["period"])
            y = torch.cat([labels[k] for k in keys])
            p = torch.cat([seen[k][name] for k in keys])
            assert r["ne"] == pytest.approx(ne(y, p), rel=1e-6)
    # Warm-up: every strategy serves the dense model; afterwards the sparse ones differ.
    for name in strat:
        assert torch.equal(seen[(0, 3)][name], seen[(0, 3)]["dense"])
    for name in ("prune_once", "d2s", "ad2s"):
        assert not torch.equal(seen[(2, 0)][name], seen[(2, 0)]["dense"])
    # Schedules: prune_once once; d2s every period end from the warm-up on; r=2 every other.
    assert [g["period"] for g in strat["prune_once"]["regenerations"]] == [0]
    assert [g["period"] for g in strat["d2s"]["regenerations"]] == [0, 1, 2, 3]
    assert [g["period"] for g in strat["d2s:r=2"]["regenerations"]] == [0, 2]
    assert strat["ad2s"]["regenerations"][0]["reason"] == "warmup"
    for name in ("prune_once", "d2s", "ad2s"):
        # Density budget 0.3 of the prunable layers; the 1-wide head (thinner than a block)
        # stays dense, so the whole MLP is a little denser.
        assert 0.3 <= strat[name]["serving_density"] < 0.35
        assert set(strat[name]["layer_densities"]) == {"bottom_mlp.0", "bottom_mlp.2",
                                                       "top_mlp.0", "top_mlp.2"}
    for name in ("prune_once", "d2s", "d2s:r=2", "ad2s"):
        serving = next(s for s in t.strategies if s.name == name).serving.model
        assert sum(isinstance(m, BlockSparseLinear) for m in serving.modules()) == 4


def test_progressive_validation_predicts_before_training():
    stream = tiny_stream(periods=2, samples=256)
    cfg = tiny_cfg(strategies=["dense"])
    recorded = []
    trainer(stream, cfg, on_batch=lambda p, i, b, preds: recorded.append(preds["dense"])).run()
    # Replay by hand: predict with the current weights, then take the Adam step.
    torch.manual_seed(cfg.seed)
    model = DLRM(stream.num_dense, stream.embedding_sizes, **TINY_MODEL)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = [b for p in range(2) for b in stream.period(p)]
    assert len(batches) == len(recorded)
    for batch, got in zip(batches, recorded):
        with torch.no_grad():
            before = torch.sigmoid(model(batch.dense, batch.sparse))
        torch.testing.assert_close(got, before, rtol=1e-5, atol=1e-6)
        loss = F.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            after = torch.sigmoid(model(batch.dense, batch.sparse))
        assert not torch.allclose(got, after)  # the order would be visible


@pytest.fixture(autouse=True)
def _one_thread():
    """Like the CLI default: one thread is much faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ad2s_triggers_and_intervals():
    stream = tiny_stream(periods=3, samples=512)  # 8 batches/period, windows of 2 batches
    # A negative tolerance fires as soon as min_interval windows exist (the smoothed gap is
    # never below its own minimum), so regenerations come every min_interval windows; with the
    # immediate handover no challenger holds the trigger back: 8 windows after warm-up -> 4.
    always = trainer(stream, tiny_cfg(strategies=["ad2s"], ne_tolerance=-1.0, min_interval=2,
                                      max_interval=50, handover="immediate")).run()
    ad2s = always["strategies"]["ad2s"]
    regen = ad2s["regenerations"]
    assert [g["reason"] for g in regen] == ["warmup"] + ["ne_gap"] * 4
    windows = ad2s["windows"]
    gaps = [w["ne_gap"] for w in windows]
    for j, w in enumerate(windows):
        since = 1 + j % 2  # a regeneration every 2 windows
        assert w["smoothed_gap"] == pytest.approx(sum(gaps[j + 1 - since: j + 1]) / since)
        # The baseline (lowest mean gap since the last regeneration) exists once min_interval
        # windows have passed.
        assert (w["baseline"] is None) == (since < 2)
    never = trainer(stream, tiny_cfg(strategies=["ad2s"], ne_tolerance=10.0, drift_bound=2.0,
                                     min_interval=1, max_interval=3,
                                     handover="immediate")).run()
    regen = never["strategies"]["ad2s"]["regenerations"]
    assert [g["reason"] for g in regen[1:]] == ["max_interval"] * 2
    windows = never["strategies"]["ad2s"]["windows"]
    assert len(windows) == 8 and all(math.isfinite(w["ne_gap"]) for w in windows)


def _lone_strategy(cls, cfg: OnlineConfig):
    """A strategy of kind ``cfg.strategies[0]`` outside a trainer, its first model made."""
    stream = tiny_stream(periods=2, samples=256)
    comps = default_components(stream.num_dense, stream.embedding_sizes, model=TINY_MODEL)
    strat = cls(parse_strategies(cfg.strategies, cfg)[0], cfg, comps, DistContext())
    dense = DenseTrack(comps, cfg, DistContext())
    buffer = list(stream.period(0))
    strat.regenerate(dense, buffer, 0, -1, "warmup")
    return strat, dense, buffer


def test_ad2s_change_detector_fires_on_a_grown_gap():
    cfg = tiny_cfg(strategies=["ad2s"], min_interval=2, max_interval=100, ne_tolerance=0.01,
                   drift_bound=2.0, baseline_windows=2)
    strat, dense, buffer = _lone_strategy(AD2SStrategy, cfg)
    fired = []
    for j, gap in enumerate([0.05, 0.03, 0.02, 0.02, 0.025, 0.034, 0.04]):
        strat.windows.append({"period": 1, "batch": j, "ne_gap": gap})
        strat.end_window(1, j, dense, buffer)
        fired.append(len(strat.regenerations) > 1)
    # Smoothed (2 windows): .04 .025 .02 .0225 .0295 .037; the minimum .02 + 0.01 is first
    # exceeded by .037 at the last window.
    assert fired == [False] * 6 + [True]
    assert strat.regenerations[-1]["reason"] == "ne_gap"
    assert strat.regenerations[-1]["baseline"] == pytest.approx(0.02)


def test_challenger_takes_over_only_when_better():
    cfg = tiny_cfg(strategies=["d2s"], handover_windows=2, challenger_patience=3,
                   handover_margin=0.01)
    strat, dense, buffer = _lone_strategy(D2SStrategy, cfg)
    first = strat.serving
    assert strat.challenger is None  # the first sparse model serves at once
    strat.regenerate(dense, buffer, 1, -1, "schedule")
    second = strat.challenger
    assert second is not None and strat.serving is first

    def window(champion: float, challenger: float) -> None:
        res = {"serving": {"logloss": champion, "count": 10},
               "challenger": {"logloss": challenger, "count": 10}}
        strat._duel_window(1, 0, res)

    window(0.50, 0.40)  # one window is not enough
    assert strat.serving is first
    window(0.50, 0.62)  # two windows: 0.90 vs 1.02 summed: worse, keeps serving the champion
    assert strat.serving is first and strat.challenger is second
    window(0.50, 0.40)  # third window = patience: last two 1.00 vs 1.02 -> dropped
    assert strat.serving is first and strat.challenger is None
    assert strat.handovers[-1]["outcome"] == "dropped"
    strat.regenerate(dense, buffer, 1, -1, "schedule")
    third = strat.challenger
    window(0.50, 0.49)
    window(0.50, 0.49)  # 1.0 vs 0.98: a 2% lead beats the 1% margin
    assert strat.serving is third and strat.challenger is None
    assert strat.handovers[-1]["outcome"] == "won"
    assert strat.handovers[-1]["gain"] == pytest.approx(0.02)


def test_ad2s_backs_off_after_dropped_challengers():
    # ne_tolerance < 0: the detector wants a regeneration at every window once allowed.
    cfg = tiny_cfg(strategies=["ad2s"], min_interval=1, max_interval=100, ne_tolerance=-1.0,
                   drift_bound=2.0, handover_windows=1, challenger_patience=1)
    strat, dense, buffer = _lone_strategy(AD2SStrategy, cfg)
    loses = {"serving": {"logloss": 0.5, "count": 10}, "challenger": {"logloss": 0.6, "count": 10}}
    wins = {"serving": {"logloss": 0.5, "count": 10}, "challenger": {"logloss": 0.4, "count": 10}}
    regenerated_at = []

    def window(j: int, duel: dict) -> None:
        strat.windows.append({"period": 1, "batch": j, "ne_gap": 0.0})
        if strat.challenger is not None:
            strat._duel_window(1, j, duel)
        before = len(strat.regenerations)
        strat.end_window(1, j, dense, buffer)
        if len(strat.regenerations) > before:
            regenerated_at.append(j)

    for j in range(15):
        window(j, loses)
    # Each challenger is dropped at the window after it was made (patience 1); the windows
    # from one regeneration to the next double: 2, 4, 8 (min_interval x 2 ** dropped in a row).
    assert regenerated_at == [0, 2, 6, 14]
    assert strat.dropped_in_row == 3
    assert [h["outcome"] for h in strat.handovers] == ["dropped"] * 3
    window(15, wins)  # the challenger of window 14 wins: the interval is back to 1 window
    assert strat.handovers[-1]["outcome"] == "won" and strat.dropped_in_row == 0
    assert regenerated_at[-1] == 15


def _feed_gaps(strat, dense, buffer, gaps, start: int = 0) -> list[int]:
    """Windows with these NE gaps through ``end_window``; the windows that regenerated."""
    fired = []
    for j, gap in enumerate(gaps, start):
        before = len(strat.regenerations)
        strat.windows.append({"period": 1, "batch": j, "ne_gap": gap})
        strat.end_window(1, j, dense, buffer)
        if len(strat.regenerations) > before:
            fired.append(j)
    return fired


@pytest.mark.parametrize("follow_up", [False, True])
def test_ad2s_follow_up_regenerates_until_back_at_the_old_level(follow_up):
    cfg = tiny_cfg(strategies=["ad2s"], min_interval=2, max_interval=100, ne_tolerance=0.01,
                   drift_bound=2.0, handover="immediate", follow_up=follow_up)
    strat, dense, buffer = _lone_strategy(AD2SStrategy, cfg)
    # Level 0 before a change; the gap jumps (smoothed over 2 windows: 0.025, fires at window
    # 2); the regenerated model is still 3 points behind the old level, then back within the
    # tolerance.
    fired = _feed_gaps(strat, dense, buffer, [0.0, 0.0, 0.05, 0.03, 0.03, 0.005, 0.005, 0.005,
                                              0.005])
    if follow_up:
        # Two windows later (min_interval) the old baseline 0.0 is still exceeded: again.
        assert fired == [2, 4]
        assert [g["baseline"] for g in strat.regenerations[1:]] == [0.0, 0.0]
    else:
        assert fired == [2]  # the baseline restarts at the new model's 0.03
    assert all(g["reason"] == "ne_gap" for g in strat.regenerations[1:])


def test_ad2s_follow_up_accepts_the_level_after_a_dropped_challenger():
    cfg = tiny_cfg(strategies=["ad2s"], min_interval=2, max_interval=100, ne_tolerance=0.01,
                   drift_bound=2.0, challenger_patience=1, follow_up=True, max_backoff=0)
    strat, dense, buffer = _lone_strategy(AD2SStrategy, cfg)
    assert _feed_gaps(strat, dense, buffer, [0.0, 0.0, 0.05]) == [2]
    loses = {"serving": {"logloss": 0.5, "count": 10},
             "challenger": {"logloss": 0.6, "count": 10}}
    strat._duel_window(1, 3, loses)  # the challenger did no better than the serving model
    assert strat.handovers[-1]["outcome"] == "dropped" and strat.best_smoothed is None
    # The serving model's 0.05 is now the level: no more triggers while it holds (with the
    # old baseline 0.0 kept, window 4 would fire).
    assert _feed_gaps(strat, dense, buffer, [0.05, 0.05, 0.05, 0.055], start=3) == []


@pytest.mark.parametrize("baseline_windows, expected", [(2, [6, 8]), (4, [8])])
def test_ad2s_baseline_over_longer_windows_ignores_a_lucky_pair(baseline_windows, expected):
    cfg = tiny_cfg(strategies=["ad2s"], min_interval=2, max_interval=100, ne_tolerance=0.01,
                   drift_bound=2.0, handover="immediate", baseline_windows=baseline_windows)
    strat, dense, buffer = _lone_strategy(AD2SStrategy, cfg)
    # Noise around 0: one lucky pair (-0.008) then an unlucky one (+0.005), then a real jump.
    # Over 2 windows the lowest mean is -0.008 and the trigger's 0.0025 at window 6 is 0.0105
    # above it (the jump fires too); over 4 windows the lowest mean is -0.004, and only the
    # jump (window 8) fires.
    fired = _feed_gaps(strat, dense, buffer, [0.0, 0.0, -0.008, -0.008, 0.0, 0.0, 0.005, 0.005,
                                              0.03])
    assert fired == expected
    assert strat.regenerations[1]["baseline"] == pytest.approx(-0.008 if baseline_windows == 2
                                                               else -0.004)


def test_strategy_knobs_apply_to_that_strategy_only():
    cfg = tiny_cfg(strategies=["ad2s", "ad2s:min_interval=3:follow_up=0:ne_tolerance=0.02"])
    plain, tuned = parse_strategies(cfg.strategies, cfg)
    assert plain.config(cfg) is cfg and plain.overrides == ()
    own = tuned.config(cfg)
    assert (own.min_interval, own.follow_up, own.ne_tolerance) == (3, False, 0.02)
    assert (cfg.min_interval, cfg.follow_up, cfg.ne_tolerance) == (2, True, 0.01)
    stream = tiny_stream(periods=2, samples=256)
    comps = default_components(stream.num_dense, stream.embedding_sizes, model=TINY_MODEL)
    strat = AD2SStrategy(tuned, cfg, comps, DistContext())
    assert strat.cfg.min_interval == 3 and strat.cfg.density == cfg.density


@pytest.mark.parametrize("item, message", [
    ("ad2s:min_interval=0", "min_interval must be >= 1"),
    ("ad2s:min_interval=70", "max_interval must be >= min_interval"),
    ("ad2s:follow_up=maybe", "bad strategy option"),
    ("ad2s:drift_bound=-0.5", "drift_bound must be >= 0"),
    ("ad2s:baseline_windows=0", "baseline_windows must be >= 1"),
    ("ad2s:lr=1", "bad strategy option 'lr=1'"),
    ("ad2s:challenger_patience=1:windows=2", "need 1 <= windows <= challenger_patience"),
])
def test_strategy_knob_errors(item, message):
    with pytest.raises(ValueError, match=message):
        parse_strategies([item], OnlineConfig())


def test_ad2s_trigger_replaces_a_challenger_in_flight():
    cfg = tiny_cfg(strategies=["ad2s"], min_interval=2, max_interval=100, ne_tolerance=0.01,
                   drift_bound=2.0, handover_windows=2, challenger_patience=50)
    strat, dense, buffer = _lone_strategy(AD2SStrategy, cfg)
    champion = strat.serving
    challengers = []
    close = {"serving": {"logloss": 0.5, "count": 10}, "challenger": {"logloss": 0.5, "count": 10}}
    # A gap that keeps growing (a regime change the serving model cannot follow).
    for j, gap in enumerate([0.0, 0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12]):
        strat.windows.append({"period": 1, "batch": j, "ne_gap": gap})
        if strat.challenger is not None:
            strat._duel_window(1, j, close)  # never better: it would stay in flight for 50
        strat.end_window(1, j, dense, buffer)
        if strat.challenger is not None and (not challengers or
                                             strat.challenger is not challengers[-1]):
            challengers.append(strat.challenger)
    assert len(challengers) >= 2  # the second trigger did not wait for the first challenger
    assert strat.serving is champion and strat.handovers == []
    assert [g["reason"] for g in strat.regenerations[1:]] == ["ne_gap"] * len(challengers)


def test_challenger_in_flight_survives_checkpoint(tmp_path):
    stream = tiny_stream(periods=4, samples=384)
    # Patience long enough that a challenger is in flight at the period-1 checkpoint.
    cfg = tiny_cfg(strategies=["d2s", "ad2s", "d2s:handover=immediate"], min_interval=1,
                   handover_windows=2, challenger_patience=6)
    full = trainer(stream, cfg).run()
    crash = RuntimeError("simulated crash")

    def stop_after_period_1(p: int) -> None:
        if p == 1:
            raise crash

    first = trainer(tiny_stream(periods=4, samples=384), cfg, checkpoint_dir=str(tmp_path),
                    on_period_end=stop_after_period_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.run()
    saved = load_checkpoint(tmp_path)
    assert saved["next_period"] == 2
    assert saved["strategies"]["d2s"]["challenger"] is not None
    res = trainer(tiny_stream(periods=4, samples=384), cfg, checkpoint_dir=str(tmp_path)).run()
    for name, s in full["strategies"].items():
        got = res["strategies"][name]
        assert [r["period"] for r in got["periods"]] == [0, 1, 2, 3]
        for a, b in zip(s["periods"], got["periods"]):
            assert b["ne"] == pytest.approx(a["ne"], rel=1e-5)
        assert got["handovers"] == s["handovers"]
        assert [g["mask_digest"] for g in got["regenerations"]] == [
            g["mask_digest"] for g in s["regenerations"]]
    assert full["strategies"]["d2s:handover=immediate"]["handovers"] == []


def test_handover_windows_per_strategy():
    cfg = tiny_cfg(strategies=["d2s", "d2s:windows=1"], handover_windows=3)
    specs = parse_strategies(cfg.strategies, cfg)
    assert [s.handover_windows for s in specs] == [3, 1]
    res = trainer(tiny_stream(periods=4, samples=384), cfg).run()
    for name, least in (("d2s", 3), ("d2s:windows=1", 1)):
        ended = res["strategies"][name]["handovers"]
        assert ended and all(h["windows"] >= least for h in ended)
    # With one window, every duel ends at its first window (won) or at patience (dropped).
    assert all(h["windows"] == 1 or h["outcome"] == "dropped"
               for h in res["strategies"]["d2s:windows=1"]["handovers"])
    for bad in ("d2s:windows=0", "d2s:windows=17", "d2s:windows=x"):
        with pytest.raises(ValueError, match="windows"):
            parse_strategies([bad], cfg)


def test_mask_drift_measures_changed_ranking():
    stream = tiny_stream(periods=2, samples=256)
    cfg = tiny_cfg(strategies=["ad2s"])
    comps = default_components(stream.num_dense, stream.embedding_sizes, model=TINY_MODEL)
    spec = parse_strategies(["ad2s"], cfg)[0]
    dense = DenseTrack(comps, cfg, DistContext())
    strat = AD2SStrategy(spec, cfg, comps, DistContext())
    strat.regenerate(dense, list(stream.period(0)), 0, -1, "warmup")
    assert strat.mask_drift(dense) == 0.0
    layer = dense.model.top_mlp[0]
    kept = strat.reference_mask["top_mlp.0"]
    with torch.no_grad():  # swap which blocks are large in one layer: its whole share moves
        big = layer.weight.abs().max() * 10
        grid = torch.ones(kept.shape, dtype=torch.bool)
        grid[kept] = False
        full = grid.repeat_interleave(8, 0).repeat_interleave(8, 1)
        full = full[: layer.weight.shape[0], : layer.weight.shape[1]]
        layer.weight[full] = big
    moved = int(kept.sum())
    total = sum(int(m.sum()) for m in strat.reference_mask.values())
    assert strat.mask_drift(dense) == pytest.approx(min(moved, int(grid.sum())) / total)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    stream = tiny_stream(periods=3, samples=256)
    cfg = tiny_cfg(strategies=["prune_once", "d2s", "ad2s"], min_interval=1)
    full = trainer(stream, cfg).run()
    # Run the first period only, checkpoint, and resume in a fresh trainer.
    first = trainer(tiny_stream(periods=3, samples=256), cfg, checkpoint_dir=str(tmp_path))
    first._maybe_resume()
    first._run_period(0)
    first.next_period = 1
    save_checkpoint(tmp_path, first.state_dict())
    resumed = trainer(tiny_stream(periods=3, samples=256), cfg, checkpoint_dir=str(tmp_path))
    res = resumed.run()
    for name, s in full["strategies"].items():
        got = res["strategies"][name]
        assert [r["period"] for r in got["periods"]] == [0, 1, 2]
        for a, b in zip(s["periods"], got["periods"]):
            assert b["ne"] == pytest.approx(a["ne"], rel=1e-5)
        assert len(got["regenerations"]) == len(s["regenerations"])
    assert load_checkpoint(tmp_path)["next_period"] == 3
    other = trainer(tiny_stream(periods=3, samples=256),
                    tiny_cfg(strategies=["prune_once", "d2s", "ad2s"], min_interval=1,
                             density=0.5), checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"different settings \(config.density: 0.3 -> 0.5\)"):
        other.run()


def test_two_processes_match_one(tmp_path):
    base = {"periods": 3, "samples_per_period": 256, "batch_size": 64, "max_table_rows": 40,
            "model": TINY_MODEL, "progress": False}
    cfg = {"strategies": ["d2s"], "density": 0.3, "block_size": (8, 8), "prune_steps": 3,
           "buffer_batches": 3}
    one = run_experiment(Experiment(cfg=OnlineConfig(**cfg), nproc=1, **base))
    two = run_experiment(Experiment(cfg=OnlineConfig(**cfg), nproc=2, **base))
    assert two["world"] == 2
    for name in ("dense", "d2s"):
        a, b = one["strategies"][name], two["strategies"][name]
        for ra, rb in zip(a["periods"], b["periods"]):
            assert rb["count"] == ra["count"]
            assert rb["ne"] == pytest.approx(ra["ne"], rel=1e-4)
    regen = two["strategies"]["d2s"]["regenerations"]
    assert len(regen) == 3 and all(g["ranks_agree"] for g in regen)
    # Same dense model (up to summation order) -> the same masks as the 1-process run.
    assert [g["mask_digest"] for g in regen] == [
        g["mask_digest"] for g in one["strategies"]["d2s"]["regenerations"]]


def test_streaming_metrics_survive_checkpoint(tmp_path):
    m = StreamingMetrics()
    m.update(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.2, 0.7, 0.4]))
    save_checkpoint(tmp_path, {"m": m.state_dict()})
    back = StreamingMetrics()
    back.load_state_dict(load_checkpoint(tmp_path)["m"])
    assert back.compute() == m.compute()
    assert not list(tmp_path.glob(".online-*"))  # no temporary file left behind


def test_carry_adam_state_gathers_the_stored_blocks():
    torch.manual_seed(3)
    dense = torch.nn.Sequential(torch.nn.Embedding(11, 5), torch.nn.Flatten(),
                                torch.nn.Linear(15, 37), torch.nn.ReLU(), torch.nn.Linear(37, 21))
    opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        dense(torch.randint(0, 11, (9, 3))).square().mean().backward()
        opt.step()
    mask = torch.rand(3, 3) < 0.5  # block grid of the 21x37 layer with 8x16 blocks
    mask[0, 0] = True
    sparse = sparsify_(copy.deepcopy(dense), masks={"4": mask}, block_size=(8, 16))
    new = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    assert carry_adam_state(dense, opt, sparse, new) == 5
    layer = sparse[4]
    elem = mask.repeat_interleave(8, 0).repeat_interleave(16, 1)[:21, :37]
    for key in ("exp_avg", "exp_avg_sq"):
        packed = BlockSparseWeight(new.state[layer.values][key], layer.row_offsets,
                                   layer.col_indices, (21, 37), layer.t_row_offsets,
                                   layer.t_col_indices, layer.t_block_ids, check=False)
        want = opt.state[dense[4].weight][key] * elem
        torch.testing.assert_close(packed.to_dense(), want, rtol=0, atol=0)
        for name in ("0.weight", "2.weight", "2.bias", "4.bias"):
            p_new = dict(sparse.named_parameters())[name]
            p_old = dict(dense.named_parameters())[name]
            torch.testing.assert_close(new.state[p_new][key], opt.state[p_old][key])
    assert float(new.state[layer.values]["step"]) == 3.0


def test_carry_adam_state_follows_the_sorted_units():
    torch.manual_seed(4)
    dense = DLRM(3, [5, 6, 7], embedding_dim=8, bottom_mlp=[16, 8], top_mlp=[32, 16, 1])
    opt = torch.optim.Adam(dense.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        dense(torch.randn(9, 3), torch.randint(0, 5, (9, 3))).sigmoid().mean().backward()
        opt.step()
    moved = copy.deepcopy(dense)
    orders = sort_units_(moved)
    mask = torch.rand(2, 2) < 0.6
    mask[0, 0] = True
    sparse = sparsify_(moved, masks={"top_mlp.0": mask}, block_size=(16, 8))
    new = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    carry_adam_state(dense, opt, sparse, new, orders)
    layer = sparse.top_mlp[0]
    elem = mask.repeat_interleave(16, 0).repeat_interleave(8, 1)[:32, :14]
    for key in ("exp_avg", "exp_avg_sq"):
        packed = BlockSparseWeight(new.state[layer.values][key], layer.row_offsets,
                                   layer.col_indices, (32, 14), layer.t_row_offsets,
                                   layer.t_col_indices, layer.t_block_ids, check=False)
        want = permute_like("top_mlp.0.weight", opt.state[dense.top_mlp[0].weight][key],
                            orders) * elem
        torch.testing.assert_close(packed.to_dense(), want, rtol=0, atol=0)
        for name in ("top_mlp.2.weight", "top_mlp.0.bias", "bottom_mlp.0.weight"):
            old = opt.state[dict(dense.named_parameters())[name]][key]
            got = new.state[dict(sparse.named_parameters())[name]][key]
            torch.testing.assert_close(got, permute_like(name, old, orders), rtol=0, atol=0)
            assert not torch.equal(got, old)  # each of them was reordered


def test_transition_sorts_units_only_when_asked():
    stream = tiny_stream(periods=2, samples=256)
    digests = {}
    for sort_units in (False, True):
        t = trainer(stream, tiny_cfg(strategies=["prune_once"], sort_units=sort_units,
                                     distill_epochs=0))
        t._run_period(0)
        s = next(s for s in t.strategies if s.name == "prune_once")
        model = s.serving.model
        digests[sort_units] = s.regenerations[0]["mask_digest"]
        triangle = torch.equal(model.pair_index, t.dense.model.pair_index)
        assert triangle is not sort_units
    assert digests[False] != digests[True]


def test_distillation_brings_a_new_model_closer_to_the_dense_one():
    stream = tiny_stream(periods=2, samples=512)
    out = {}
    for epochs in (0, 3):
        t = trainer(stream, tiny_cfg(strategies=["prune_once"], distill_epochs=epochs))
        t._run_period(0)  # warm-up; prune_once regenerates at its end
        s = next(s for s in t.strategies if s.name == "prune_once")
        assert len(s.regenerations) == 1
        with torch.no_grad():
            out[epochs] = sum(
                float((torch.sigmoid(s.serving.model(b.dense, b.sparse))
                       - torch.sigmoid(t.dense.model(b.dense, b.sparse))).abs().mean())
                for b in t.buffer) / len(t.buffer)
    assert out[3] < 0.8 * out[0], out
