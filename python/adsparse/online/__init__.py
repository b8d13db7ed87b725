"""Online training on a stream and the dense-to-sparse paradigms (docs/online.md).

``OnlineTrainer`` runs several strategies (``dense``, ``prune_once``, ``d2s``, ``ad2s``) over
the same stream in one pass with progressive validation, checkpoints at each period end and
runs data parallel over processes; ``report`` turns the results into tables, files and plots.
"""

from adsparse.online.components import Components, default_components, loss_fn
from adsparse.online.config import (
    STRATEGY_KNOBS,
    OnlineConfig,
    StrategySpec,
    parse_strategies,
    strategy_kinds,
)
from adsparse.online.distributed import DistContext, mask_digest, spawn
from adsparse.online.experiment import Experiment, make_stream, run_experiment
from adsparse.online.report import format_table, summarize, write_report
from adsparse.online.strategies import STRATEGIES, DenseTrack, Strategy, make_strategy
from adsparse.online.trainer import OnlineTrainer

__all__ = [
    "STRATEGIES",
    "STRATEGY_KNOBS",
    "Components",
    "DenseTrack",
    "DistContext",
    "Experiment",
    "OnlineConfig",
    "OnlineTrainer",
    "Strategy",
    "StrategySpec",
    "default_components",
    "format_table",
    "loss_fn",
    "make_strategy",
    "make_stream",
    "mask_digest",
    "parse_strategies",
    "run_experiment",
    "spawn",
    "strategy_kinds",
    "summarize",
    "write_report",
]
