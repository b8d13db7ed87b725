"""The knobs of an online run, and the strategy specs parsed from ``--strategies``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from adsparse.checks import check_block_size, check_density

__all__ = ["KINDS", "OnlineConfig", "StrategySpec", "parse_strategies"]

KINDS = ("dense", "prune_once", "d2s", "ad2s")


@dataclass
class OnlineConfig:
    """Everything that decides the numbers of a run (checkpoints refuse a different one).

    ad2s intervals count *windows* of ``window_batches`` mini-batches; with the default stream
    (64 batches a period) a window is a quarter period, so regenerations are at least two and
    at most eight periods apart.
    """

    density: float = 0.1
    block_size: tuple[int, int] = (16, 16)
    pruner: str = "learned"  # the pruner of prune_once and d2s; ad2s always uses "learned"
    prune_steps: int = 100  # optimisation steps of one pruning transition
    buffer_batches: int = 64  # recent mini-batches kept for the transition (a period)
    # Epochs over the buffer that a new sparse model trains, pattern fixed, before it serves.
    # Off: on the default stream 1 epoch changed d2s (r=1) from +2.67% to +2.58% NE and
    # 3 epochs overfitted the recent batches (+20%); see benchmarks/RESULTS.md.
    finetune_epochs: int = 0
    # Epochs over the buffer in which a new model learns the dense model's predictions after
    # hardening (see strategies._distill).
    distill_epochs: int = 1
    # A new sparse model starts from the dense model's Adam state (see strategies.carry_adam_state)
    carry_optimizer: bool = True
    lr: float = 3e-3
    warmup_periods: int = 1
    r: int = 1  # d2s regeneration interval, in periods
    window_batches: int = 16  # ad2s: NE gap and mask drift are measured per window
    ne_tolerance: float = 0.005  # ad2s: regenerate when (NE_sparse - NE_dense)/NE_dense exceeds
    # this and the gap a fresh sparse model showed (see AD2SStrategy)
    drift_bound: float = 0.5  # ad2s: ... or when this share of the serving mask would change
    # ad2s: windows between regenerations, at least ... (two periods: on the default stream a
    # new model costs about 1% NE in its first period, 4 windows gave +0.89% with 4
    # regenerations, 8 windows +0.90% with 1; see benchmarks/RESULTS.md)
    min_interval: int = 8
    max_interval: int = 32  # ... and at most
    device: str = "cpu"
    seed: int = 0
    strategies: list[str] = field(default_factory=lambda: list(KINDS))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_size"] = list(self.block_size)
        return d

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad knob."""
        check_density(self.density)
        check_block_size(self.block_size, "block size")
        if self.distill_epochs < 0:
            raise ValueError(f"distill_epochs must be >= 0, got {self.distill_epochs}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        for name in ("prune_steps", "buffer_batches", "r", "window_batches", "min_interval",
                     "max_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_periods < 1:
            raise ValueError(f"warmup_periods must be >= 1, got {self.warmup_periods}")
        if self.max_interval < self.min_interval:
            raise ValueError("max_interval must be >= min_interval")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        parse_strategies(self.strategies, self)


@dataclass(frozen=True)
class StrategySpec:
    """One strategy of a run: its kind and the density / interval it uses."""

    name: str
    kind: str
    density: float
    r: int


def parse_strategies(items: list[str], cfg: OnlineConfig) -> list[StrategySpec]:
    """Parse ``kind[:r=R][:density=D]`` items (``d2s:r=2``, ``ad2s:density=0.05``).

    Plain kinds take ``cfg.density`` and ``cfg.r``; the item text is the strategy's name.
    """
    specs: list[StrategySpec] = []
    for item in items:
        kind, *opts = item.strip().split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown strategy {kind!r} (choose from {', '.join(KINDS)})")
        density, r = cfg.density, cfg.r
        for opt in opts:
            key, _, value = opt.partition("=")
            try:
                if key == "r":
                    r = int(value)
                elif key == "density":
                    density = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad strategy option {opt!r} in {item!r} "
                                 "(use r=INT or density=FLOAT)") from None
        if r < 1:
            raise ValueError(f"strategy {item!r}: need r >= 1")
        check_density(density, f"strategy {item!r}: density")
        if kind == "dense":
            density = 1.0
        specs.append(StrategySpec(item.strip(), kind, density, r))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat a name: {names}")
    return specs
