"""The knobs of an online run, and the strategy specs parsed from ``--strategies``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from adsparse.checks import check_block_size, check_density

__all__ = ["HANDOVERS", "STRATEGY_KNOBS", "OnlineConfig", "StrategySpec", "parse_strategies",
           "strategy_kinds"]

HANDOVERS = ("challenger", "immediate")

#: ``OnlineConfig`` knobs one strategy may set for itself (``ad2s:min_interval=2``), so that
#: variants run side by side on the same batches and are compared paired.
STRATEGY_KNOBS = ("ne_tolerance", "drift_bound", "min_interval", "max_interval", "max_backoff",
                  "follow_up", "baseline_windows", "handover_margin", "challenger_patience",
                  "learned_repair")


def strategy_kinds() -> list[str]:
    """The strategy kinds, read from the one registry (``strategies.STRATEGIES``)."""
    from adsparse.online.strategies import STRATEGIES  # the registry imports this module

    return list(STRATEGIES)


@dataclass
class OnlineConfig:
    """Everything that decides the numbers of a run (checkpoints refuse a different one).

    ad2s intervals, handovers and patience count *windows* of ``window_batches`` mini-batches;
    with the default stream (192 batches a period) a window is an eighth of a period, so ad2s
    regenerations are at least a quarter of a period and at most eight periods apart.
    """

    density: float = 0.1
    block_size: tuple[int, int] = (16, 16)
    pruner: str = "learned"  # the pruner of prune_once and d2s; ad2s always uses "learned"
    # learned: every layer keeps at least this share of the density. Online a sparse model
    # trains on for many periods after its mask is chosen, so the transition's one-step-ahead
    # profiles must not starve a layer (0.5 cost 1-4 points of NE on the control stream;
    # 0.75 was as good as uniform; docs/online.md).
    learned_min_share: float = 0.75
    # learned: measure block cuts refit to the layer's old output and apply the refit
    # (LearnedConfig.repair/realize, docs/pruning.md). Off: online, ad2s with it was 0.25 points
    # of relative NE worse on 3 of 3 seeds (within CI; docs/online.md).
    learned_repair: bool = False
    # A regeneration must cost at most one period of dense training (192 steps on the default
    # stream): the transition's steps plus one distillation epoch over the buffer.
    prune_steps: int = 40  # optimisation steps of one pruning transition
    buffer_batches: int = 32  # recent mini-batches kept for the transition (a sixth of a period)
    prune_batches: int = 32  # the last this many of them are what the pruner sees
    # Epochs over the buffer in which a new model learns the dense model's predictions after
    # hardening (see regeneration.distill).
    distill_epochs: int = 1
    # Sort hidden units and reorderable inputs by magnitude before choosing the blocks
    # (docs/online.md, "A regeneration"): the same function, denser blocks.
    sort_units: bool = True
    # A new sparse model starts from the dense model's Adam state (regeneration.carry_adam_state)
    carry_optimizer: bool = True
    lr: float = 3e-3
    warmup_periods: int = 1
    r: int = 1  # d2s regeneration interval, in periods
    # How a regenerated model starts serving: "challenger" (trains beside the serving model and
    # takes over only when better on the recent windows) or "immediate" (serves at once).
    handover: str = "challenger"
    # Windows over which challenger and champion are compared. 1: a regenerated model serves
    # after one window (an eighth of a period) in which it beat the serving one; 4 windows cost
    # 0.57 +- 0.28 points of relative NE on the default stream (5 seeds; benchmarks/RESULTS.md).
    handover_windows: int = 1
    handover_margin: float = 0.0  # relative log-loss lead the challenger needs to take over
    challenger_patience: int = 16  # windows after which a challenger that has not won is dropped
    window_batches: int = 24  # NE gaps, handovers and the ad2s triggers work per window
    # ad2s: regenerate when the mean gap of the last min_interval windows has grown by more
    # than this (relative NE) above its lowest value since the last regeneration (AD2SStrategy;
    # with follow_up, since before the change)
    ne_tolerance: float = 0.01
    drift_bound: float = 0.5  # ad2s: ... or when this share of the serving mask would change
    min_interval: int = 2  # ad2s: windows between regenerations, at least ...
    # ... and at most. 64 windows (8 periods): under drift the gap triggers fire long before
    # (every ad2s number of the 10-seed drift run identical at 32 and 64); on stationary data
    # each forced regeneration was one more (2.3 -> 1.3 regenerations, same NE; RESULTS.md).
    max_interval: int = 64
    # ad2s: each dropped challenger in a row doubles both intervals, at most 2**max_backoff x
    max_backoff: int = 3
    # ad2s: after a regeneration the gap triggered, keep the gap's baseline from before the
    # change, so ad2s regenerates again (min_interval windows later) while the serving model is
    # still more than ne_tolerance behind where it stood; the dense model it copies has by then
    # learned more of the new data. A dropped challenger accepts the level reached. With
    # min_interval 2 it took ad2s from +0.64% to +0.22% on held-out seeds (docs/online.md).
    follow_up: bool = True
    # ad2s: the level the gap is compared with is the lowest mean gap over this many windows
    # (fewer right after a regeneration). The lowest of many noisy means is biased low, and the
    # longer the mean, the less: over 2 windows one lucky pair set a bar that noise crossed. 8
    # (a period): 1 regeneration in each of 6 no-drift seeds (was 1-3), 7.9 under drift (was
    # 10.0), relative NE +0.27% (was +0.23%, within CI; benchmarks/RESULTS.md).
    baseline_windows: int = 8
    device: str = "cpu"
    seed: int = 0
    strategies: list[str] = field(default_factory=lambda: ["dense", "prune_once", "d2s", "ad2s"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_size"] = list(self.block_size)
        return d

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad knob or strategy."""
        self.check_knobs()
        parse_strategies(self.strategies, self)

    def check_knobs(self) -> None:
        """Raise ``ValueError`` naming the first bad knob (strategies not included)."""
        check_density(self.density)
        check_block_size(self.block_size, "block size")
        if not 0.0 <= self.learned_min_share <= 1.0:
            raise ValueError(f"learned_min_share must be in [0, 1], got {self.learned_min_share}")
        if self.max_backoff < 0:
            raise ValueError(f"max_backoff must be >= 0, got {self.max_backoff}")
        if self.distill_epochs < 0:
            raise ValueError(f"distill_epochs must be >= 0, got {self.distill_epochs}")
        for name in ("prune_steps", "buffer_batches", "prune_batches", "r", "window_batches",
                     "min_interval", "max_interval", "handover_windows", "challenger_patience",
                     "baseline_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_periods < 1:
            raise ValueError(f"warmup_periods must be >= 1, got {self.warmup_periods}")
        if self.max_interval < self.min_interval:
            raise ValueError("max_interval must be >= min_interval")
        if self.handover not in HANDOVERS:
            raise ValueError(f"handover must be one of {', '.join(HANDOVERS)}, got "
                             f"{self.handover!r}")
        if not 0.0 <= self.handover_margin < 1.0:
            raise ValueError(f"handover_margin must be in [0, 1), got {self.handover_margin}")
        if self.challenger_patience < self.handover_windows:
            raise ValueError("challenger_patience must be >= handover_windows")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.drift_bound < 0.0:
            raise ValueError(f"drift_bound must be >= 0, got {self.drift_bound}")


@dataclass(frozen=True)
class StrategySpec:
    """One strategy of a run: its kind and the density, interval and handover it uses."""

    name: str
    kind: str
    density: float
    r: int
    handover: str = "challenger"
    handover_windows: int = 1  # windows a challenger must beat the serving model over
    overrides: tuple[tuple[str, Any], ...] = ()  # STRATEGY_KNOBS this strategy sets itself

    def config(self, cfg: OnlineConfig) -> OnlineConfig:
        """``cfg`` with this strategy's own knobs."""
        return replace(cfg, **dict(self.overrides)) if self.overrides else cfg


def _knob_value(cfg: OnlineConfig, key: str, value: str) -> Any:
    kind = type(getattr(cfg, key))
    if kind is bool:
        if value.lower() not in ("0", "1", "true", "false"):
            raise ValueError
        return value.lower() in ("1", "true")
    return kind(value)


def parse_strategies(items: list[str], cfg: OnlineConfig) -> list[StrategySpec]:
    """Parse ``kind[:r=R][:density=D][:handover=H][:windows=W][:KNOB=V]`` items (``d2s:r=2``,
    ``ad2s:density=0.05``, ``ad2s:handover=immediate``, ``ad2s:windows=1``,
    ``ad2s:min_interval=2``; a KNOB is one of ``STRATEGY_KNOBS``).

    Plain kinds take ``cfg.density``, ``cfg.r``, ``cfg.handover``, ``cfg.handover_windows`` and
    the config's knobs; the item text is the strategy's name.
    """
    kinds = strategy_kinds()
    specs: list[StrategySpec] = []
    for item in items:
        kind, *opts = item.strip().split(":")
        if kind not in kinds:
            raise ValueError(f"unknown strategy {kind!r} (choose from {', '.join(kinds)})")
        density, r, handover = cfg.density, cfg.r, cfg.handover
        windows = cfg.handover_windows
        overrides: dict[str, Any] = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            try:
                if key == "r":
                    r = int(value)
                elif key == "density":
                    density = float(value)
                elif key == "handover" and value in HANDOVERS:
                    handover = value
                elif key == "windows":
                    windows = int(value)
                elif key in STRATEGY_KNOBS:
                    overrides[key] = _knob_value(cfg, key, value)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad strategy option {opt!r} in {item!r} (use r=INT, "
                                 f"density=FLOAT, handover={'|'.join(HANDOVERS)}, "
                                 f"windows=INT or one of {', '.join(STRATEGY_KNOBS)})") from None
        if r < 1:
            raise ValueError(f"strategy {item!r}: need r >= 1")
        spec = StrategySpec(item.strip(), kind, density, r, handover, windows,
                            tuple(sorted(overrides.items())))
        own = spec.config(cfg)
        if not 1 <= windows <= own.challenger_patience:
            raise ValueError(f"strategy {item!r}: need 1 <= windows <= challenger_patience "
                             f"({own.challenger_patience})")
        check_density(density, f"strategy {item!r}: density")
        if overrides:
            try:
                own.check_knobs()
            except ValueError as e:
                raise ValueError(f"strategy {item!r}: {e}") from None
        if kind == "dense":
            spec = replace(spec, density=1.0)
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat a name: {names}")
    return specs
