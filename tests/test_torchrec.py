"""TorchRec interop (``adsparse[torchrec]``): its DLRM under sparsify_/Pruner, its batches, its
NE, and the online trainer on DistributedModelParallel with sharded tables (2 gloo processes).

Skipped when torchrec is not installed; ``make setup`` installs it (requirements-torchrec.txt).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchrec", reason="adsparse[torchrec] is not installed "
                                       "(make setup installs requirements-torchrec.txt)")

from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric

from adsparse.cli import main
from adsparse.data import SyntheticCTRStream
from adsparse.data.base import Batch
from adsparse.data.torchrec import TorchRecStream, from_torchrec_batch
from adsparse.layout import BlockSparseWeight
from adsparse.metrics import StreamingMetrics, ne
from adsparse.models.torchrec_dlrm import ids_to_kjt, torchrec_dlrm
from adsparse.nn import BlockSparseLinear, prunable_layers, sparsify_
from adsparse.online import OnlineConfig, OnlineTrainer
from adsparse.online.components import block_pruner, loss_fn
from adsparse.online.distributed import DistContext, spawn
from adsparse.online.regeneration import make_optimizer
from adsparse.online.strategies import train_step
from adsparse.online.torchrec import full_state_dict, torchrec_components

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embedding_dim": 8, "bottom_mlp": [32, 8], "top_mlp": [48, 16, 1]}
SIZES = [20, 7, 30, 12]
NUM_DENSE = 5


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    """A 1-process TorchRec run makes its own process group; later test modules get none."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchrec_dlrm(NUM_DENSE, SIZES, **TINY)


def random_batches(n: int, rows: int = 64, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.randn(rows, NUM_DENSE, generator=g),
                  torch.stack([torch.randint(0, s, (rows,), generator=g) for s in SIZES], 1),
                  torch.randint(0, 2, (rows,), generator=g).float()) for _ in range(n)]


def test_extra_is_pinned_like_the_makefile_installs_it():
    pyproject = (ROOT / "pyproject.toml").read_text()
    requirements = (ROOT / "requirements-torchrec.txt").read_text()
    extra = re.search(r'^torchrec = \["torchrec==([\d.]+)"\]', pyproject, re.M)
    pinned = re.search(r"^torchrec==([\d.]+)$", requirements, re.M)
    assert extra and pinned and extra.group(1) == pinned.group(1)
    assert "fbgemm-gpu-cpu==" in requirements  # the CPU build, not the CUDA one


def test_sparsify_and_pruner_on_torchrec_dlrm():
    model = tiny_model()
    layers = dict(prunable_layers(model))
    # TorchRec's Perceptrons hold the MLPs' nn.Linear as `_linear`; the over arch ends bare.
    assert "dlrm.dense_arch.model._mlp.0._linear" in layers
    assert "dlrm.over_arch.model.1" in layers
    batches = random_batches(4)
    pruner = block_pruner(model, 0.3, "learned", OnlineConfig(block_size=(8, 8)))
    masks = pruner.prune(batches, loss_fn, steps=4)
    assert masks and set(masks) <= set(layers)
    # The reference: the dense model with the pruned blocks zeroed.
    reference = copy.deepcopy(model)
    ref_layers = dict(prunable_layers(reference))
    with torch.no_grad():
        for fqn, mask in masks.items():
            w = ref_layers[fqn].weight
            w.copy_(BlockSparseWeight.from_dense(w, (8, 8), mask=mask).to_dense())
    sparse = sparsify_(copy.deepcopy(model), masks=masks, block_size=(8, 8))
    sparse_layers = dict(prunable_layers(sparse, types=(BlockSparseLinear,)))
    assert set(sparse_layers) == set(masks)
    for fqn, mask in masks.items():
        assert torch.equal(sparse_layers[fqn].block_mask().cpu(), mask.bool())
    assert isinstance(sparse.dlrm.dense_arch.model._mlp[1]._linear, BlockSparseLinear)
    b = batches[0]
    torch.testing.assert_close(sparse(b.dense, b.sparse), reference(b.dense, b.sparse),
                               rtol=1e-5, atol=1e-5)
    # It trains: gradients reach the stored blocks and the tables.
    loss_fn(sparse, b).backward()
    assert sparse.dlrm.dense_arch.model._mlp[1]._linear.values.grad is not None
    # sparsify_ by density, as in the README, on TorchRec's model too.
    other = sparsify_(tiny_model(), density=0.25, block_size=(8, 8),
                      filter_fn=lambda m, fqn: m.in_features >= 8 and m.out_features >= 8)
    assert other(b.dense, b.sparse).shape == (64,)


def test_batches_round_trip_and_multi_hot_is_refused():
    b = random_batches(1, rows=6)[0]
    keys = [f"cat_{f}" for f in range(len(SIZES))]
    tr = TorchRecBatch(dense_features=b.dense, sparse_features=ids_to_kjt(b.sparse, keys),
                       labels=b.labels)
    back = from_torchrec_batch(tr)
    assert torch.equal(back.sparse, b.sparse) and torch.equal(back.dense, b.dense)
    assert torch.equal(back.labels, b.labels)
    # Another key order picks the columns by key.
    swapped = from_torchrec_batch(tr, [keys[1], keys[0]])
    assert torch.equal(swapped.sparse, b.sparse[:, [1, 0]])
    kjt = ids_to_kjt(b.sparse, keys)
    lengths = kjt.lengths().clone()
    lengths[0], lengths[1] = 2, 0  # row 0 has two IDs of cat_0, row 1 none
    from torchrec import KeyedJaggedTensor

    multi = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=kjt.values(), lengths=lengths)
    with pytest.raises(ValueError, match="exactly one ID per row"):
        from_torchrec_batch(TorchRecBatch(b.dense, multi, b.labels))


def _tiny_stream(periods: int = 3) -> SyntheticCTRStream:
    return SyntheticCTRStream(num_periods=periods, samples_per_period=256, seed=3, batch_size=64,
                              embedding_sizes=SIZES, num_dense=NUM_DENSE)


def _tiny_cfg(**kw) -> OnlineConfig:
    base = {"strategies": ["d2s", "ad2s"], "density": 0.3, "block_size": (8, 8),
            "prune_steps": 3, "prune_batches": 3, "buffer_batches": 3, "window_batches": 2,
            "min_interval": 1, "max_interval": 3}
    return OnlineConfig(**{**base, **kw})


def test_trainer_runs_on_torchrec_batches():
    """The trainer on TorchRecStream (KJT batches) equals the trainer on the same rows as
    [B, F] IDs: the adapter loses nothing."""
    stream = _tiny_stream(periods=2)
    keys = [f"cat_{f}" for f in range(len(SIZES))]

    def period(p: int):
        for b in stream.period(p):
            yield TorchRecBatch(b.dense, ids_to_kjt(b.sparse, keys), b.labels)

    trs = TorchRecStream(period, stream.num_periods, NUM_DENSE, SIZES, keys)
    runs = []
    for s in (trs, stream):
        comps = torchrec_components(tiny_model, 3e-3, DistContext())  # a user's own model
        runs.append(OnlineTrainer(s, _tiny_cfg(strategies=["d2s"]), comps,
                                  progress=False).run())
    a, b = runs
    for name, res in a["strategies"].items():
        assert [r["ne"] for r in res["periods"]] == [r["ne"] for r in b["strategies"][name]
                                                     ["periods"]]
    assert a["strategies"]["d2s"]["regenerations"]
    assert all(d < 1.0 for d in a["strategies"]["d2s"]["layer_densities"].values())


def test_ne_matches_torchrec_metrics():
    g = torch.Generator().manual_seed(5)
    metric = NEMetric(world_size=1, my_rank=0, batch_size=500,
                      tasks=[RecTaskInfo(name="ctr", label_name="label", prediction_name="p",
                                         weight_name="w")], window_size=10**6)
    ours = StreamingMetrics()
    labels_all, preds_all = [], []
    for _ in range(4):
        labels = (torch.rand(500, generator=g) < 0.2).float()
        preds = torch.sigmoid(torch.randn(500, generator=g) + 2 * labels - 1.5)
        metric.update(predictions={"ctr": preds}, labels={"ctr": labels},
                      weights={"ctr": torch.ones(500)})
        ours.update(labels, preds)
        labels_all.append(labels)
        preds_all.append(preds)
    theirs = metric.compute()["ne-ctr|lifetime_ne"].item()
    assert ours.compute()["ne"] == pytest.approx(theirs, rel=1e-6)
    assert ne(torch.cat(labels_all), torch.cat(preds_all)) == pytest.approx(theirs, rel=1e-6)


def _train_on_ranks(ctx: DistContext, out: str) -> None:
    """Every rank: DMP steps equal one unsharded process's steps, then the online trainer runs
    on the sharded models; rank 0 writes what it saw."""
    if ctx.world > 1:
        torch.set_num_threads(1)  # two ranks on a small machine (not the pytest process)
    comps = torchrec_components(tiny_model, 1e-2, ctx)
    local = comps.make_model()
    local_opt = make_optimizer(local, 1e-2)
    fresh = comps.make_model()
    model, opt = comps.placement.distribute(fresh, make_optimizer(fresh, 1e-2))
    for b in random_batches(3):
        train_step(local, local_opt, b, 64, DistContext())
        train_step(model, opt, ctx.share(b), 64, ctx)
    owned = [n for n, p in model.named_parameters() if n in model.sharded_names and p.numel()]
    whole = full_state_dict(model)
    diff = max((whole[k] - v).abs().max().item() for k, v in local.state_dict().items())
    cfg = _tiny_cfg()
    results = OnlineTrainer(_tiny_stream(), cfg, torchrec_components(tiny_model, cfg.lr, ctx),
                            ctx, progress=False).run()
    if ctx.is_main:
        Path(out).write_text(json.dumps({"owned": len(owned), "diff": diff,
                                         "results": results}))


def test_two_processes_match_one(tmp_path):
    """Tables sharded over 2 gloo ranks: the same parameters as one unsharded process, and the
    online trainer's masks and NE of the 1-process run."""
    spawn(_train_on_ranks, 1, (str(tmp_path / "one.json"),))
    spawn(_train_on_ranks, 2, (str(tmp_path / "two.json"),))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["owned"] == len(SIZES) and two["owned"] == len(SIZES) // 2  # rank 0's tables
    assert one["diff"] < 1e-5 and two["diff"] < 1e-4
    assert two["results"]["world"] == 2
    for name, a in one["results"]["strategies"].items():
        b = two["results"]["strategies"][name]
        for ra, rb in zip(a["periods"], b["periods"]):
            assert rb["count"] == ra["count"]
            assert rb["ne"] == pytest.approx(ra["ne"], rel=1e-4)
        regen = b["regenerations"]
        assert all(g["ranks_agree"] for g in regen)
        assert [g["mask_digest"] for g in regen] == [g["mask_digest"]
                                                     for g in a["regenerations"]]
    assert two["results"]["strategies"]["d2s"]["regenerations"]
    assert two["results"]["strategies"]["ad2s"]["regenerations"]


def test_cli_runs_torchrec_on_two_processes(tmp_path, capsys):
    args = ["run", "--model", "torchrec", "--nproc", "2", "--periods", "2",
            "--samples-per-period", "256", "--batch-size", "64", "--max-table-rows", "16",
            "--strategies", "dense,d2s", "--density", "0.3", "--block-size", "16",
            "--prune-steps", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["world"] == 2 and results["experiment"]["model"] == "torchrec"
    regen = results["strategies"]["d2s"]["regenerations"]
    assert regen and all(g["ranks_agree"] for g in regen)
    # Both ranks gathered the sharded tables into the checkpoint; the project's DLRM does not
    # resume it (test_resumed_run_equals_uninterrupted resumes one).
    dlrm = [a for a in args if a not in ("torchrec", "--model")]
    dlrm[dlrm.index("--nproc") + 1] = "1"
    assert main([*dlrm, "--model", "dlrm", "--out", str(tmp_path / "c")]) == 1
    assert "model_kind: 'torchrec' -> None" in capsys.readouterr().err


def test_resumed_run_equals_uninterrupted(tmp_path):
    """A checkpoint holds the sharded models as plain data; a run resumed from it gives the
    uninterrupted run's numbers."""
    from adsparse.online.checkpoint import save_checkpoint

    def trainer(**kw) -> OnlineTrainer:
        comps = torchrec_components(tiny_model, 3e-3, DistContext())
        return OnlineTrainer(_tiny_stream(), _tiny_cfg(), comps, progress=False, **kw)

    full = trainer().run()
    first = trainer(checkpoint_dir=str(tmp_path))
    first._run_period(0)
    first._run_period(1)
    first.next_period = 2
    save_checkpoint(tmp_path, first.state_dict())
    resumed = trainer(checkpoint_dir=str(tmp_path)).run()
    for name, res in full["strategies"].items():
        got = resumed["strategies"][name]
        for a, b in zip(res["periods"], got["periods"]):
            assert b["ne"] == pytest.approx(a["ne"], rel=1e-5)
        assert len(got["regenerations"]) == len(res["regenerations"])
        assert got["layer_densities"] == res["layer_densities"]
