"""The online trainer's pruner: the learned floor and the refit knob reach the pruner
(split from test_online.py, which holds the trainer and the strategies)."""

from __future__ import annotations

import pytest
from test_online import TINY_MODEL, tiny_cfg, tiny_stream

from adsparse.online import default_components, parse_strategies
from adsparse.online.components import loss_fn


@pytest.mark.parametrize("share", [0.0, 0.75, 1.0])
def test_online_pruner_keeps_learned_min_share_of_the_density_per_layer(share):
    stream = tiny_stream(periods=1)
    cfg = tiny_cfg(learned_min_share=share, prune_steps=8)
    comps = default_components(stream.num_dense, stream.embedding_sizes, seed=0,
                               model=TINY_MODEL)
    model = comps.make_model()
    pruner = comps.make_pruner(model, cfg.density, "learned", cfg)
    assert pruner.learned_config.min_share == share
    batches = list(stream.period(0))
    pruner.prune(batches, loss_fn, steps=cfg.prune_steps)
    group = cfg.block_size[0] * cfg.block_size[1]
    for fqn, d in pruner.layer_densities().items():
        n = model.get_submodule(fqn).weight.numel()
        assert d * n >= share * cfg.density * n - group, (fqn, d)
    with pytest.raises(ValueError, match="learned_min_share"):
        tiny_cfg(learned_min_share=1.5).validate()


@pytest.mark.parametrize("repair", [False, True])
def test_online_pruner_measures_raw_cuts_unless_learned_repair(repair):
    """``learned_repair`` (a strategy knob: ``ad2s:learned_repair=1``) turns on the refit of
    docs/pruning.md for the online pruner; off by default, as measured online."""
    cfg = tiny_cfg()
    specs = parse_strategies([f"ad2s:learned_repair={int(repair)}"], cfg)
    own = specs[0].config(cfg)
    assert own.learned_repair is repair and cfg.learned_repair is False
    stream = tiny_stream(periods=1)
    comps = default_components(stream.num_dense, stream.embedding_sizes, seed=0,
                               model=TINY_MODEL)
    pruner = comps.make_pruner(comps.make_model(), own.density, "learned", own)
    assert pruner.learned_config.repair is repair
    assert pruner.learned_config.compensate is False
