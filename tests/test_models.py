"""DLRM: shapes, presets, the interaction, a float64 reference forward, gradients, sparsify."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adsparse.models import DLRM, dlrm_preset, fuse_relu_, interaction_features, mlp_layers

SIZES = [7, 31, 3, 50, 12]  # odd table sizes, 5 fields


def _inputs(batch: int, num_dense: int, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, num_dense, generator=g) * 3
    sparse = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in sizes], dim=1)
    return dense, sparse


def _reference_logits(model: DLRM, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """The DLRM computation written out in float64 from the model's parameters."""

    def run(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for layer in seq:
            if isinstance(layer, nn.Linear):
                x = x @ layer.weight.double().T + layer.bias.double()
            elif isinstance(layer, nn.ReLU):
                x = x.clamp_min(0)
        return x

    bottom = run(model.bottom_mlp, dense.double())
    vectors = [bottom] + [t.weight.double()[sparse[:, f]] for f, t in enumerate(model.embeddings)]
    dots = [(vectors[i] * vectors[j]).sum(1, keepdim=True)
            for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    return run(model.top_mlp, torch.cat([bottom] + dots, dim=1)).squeeze(1)


def test_forward_matches_float64_reference():
    torch.manual_seed(0)
    model = DLRM(num_dense=5, embedding_sizes=SIZES, embedding_dim=6, bottom_mlp=[9, 6],
                 top_mlp=[11, 1])
    dense, sparse = _inputs(17, 5, SIZES)
    out = model(dense, sparse)
    assert out.shape == (17,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_logits(model, dense, sparse),
                               rtol=1e-5, atol=1e-5)
    probs = model.predict(dense, sparse)
    assert not probs.requires_grad
    torch.testing.assert_close(probs, torch.sigmoid(out.detach()))


def test_interaction_width_and_pairs():
    assert interaction_features(26, 16) == 16 + 27 * 26 // 2
    model = DLRM(3, SIZES, 4, [4], [1])
    assert model.top_mlp[0].in_features == interaction_features(len(SIZES), 4)
    bottom = torch.randn(2, 4)
    embedded = torch.randn(2, len(SIZES), 4)
    out = model.interact(bottom, embedded)
    vectors = torch.cat([bottom[:, None], embedded], dim=1)
    # The first dot after the bottom copy is <bottom, table 0>; the last <table F-2, table F-1>.
    torch.testing.assert_close(out[:, :4], bottom)
    torch.testing.assert_close(out[:, 4], (vectors[:, 0] * vectors[:, 1]).sum(1))
    torch.testing.assert_close(out[:, -1], (vectors[:, -2] * vectors[:, -1]).sum(1))


@pytest.mark.parametrize("name,bottom,top,dim", [
    ("kaggle", [13, 512, 256, 64, 16], [367, 512, 256, 1], 16),
    ("wide", [13, 512, 256, 64], [415, 1024, 1024, 512, 256, 1], 64),
])
def test_presets(name, bottom, top, dim):
    sizes = [5] * 26
    model = dlrm_preset(name, 13, sizes)
    layers = dict(mlp_layers(model))
    bottom_layers = [m for fqn, m in layers.items() if fqn.startswith("bottom_mlp.")]
    top_layers = [m for fqn, m in layers.items() if fqn.startswith("top_mlp.")]
    assert [bottom_layers[0].in_features] + [m.out_features for m in bottom_layers] == bottom
    assert [top_layers[0].in_features] + [m.out_features for m in top_layers] == top
    assert all(t.embedding_dim == dim for t in model.embeddings)
    # Bottom layers all end in ReLU; the top's last layer gives raw logits.
    assert isinstance(model.bottom_mlp[-1], nn.ReLU)
    assert isinstance(model.top_mlp[-1], nn.Linear)
    dense, sparse = _inputs(3, 13, sizes)
    assert model(dense, sparse).shape == (3,)
    with pytest.raises(ValueError, match="preset"):
        dlrm_preset("huge", 13, sizes)


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    model = DLRM(4, SIZES, 5, [8, 5], [7, 1])
    dense, sparse = _inputs(33, 4, SIZES, seed=2)
    labels = torch.randint(0, 2, (33,)).float()
    nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Only the looked-up embedding rows get gradient.
    table = model.embeddings[3]
    unused = torch.ones(SIZES[3], dtype=torch.bool)
    unused[sparse[:, 3]] = False
    assert table.weight.grad[unused].abs().sum() == 0


def test_mlp_layers_are_swappable_direct_children():
    model = dlrm_preset("kaggle", 13, [4] * 26)
    layers = mlp_layers(model)
    assert [fqn for fqn, _ in layers] == [
        "bottom_mlp.0", "bottom_mlp.2", "bottom_mlp.4", "bottom_mlp.6",
        "top_mlp.0", "top_mlp.2", "top_mlp.4",
    ]
    assert all(isinstance(m, nn.Linear) and model.get_submodule(fqn) is m for fqn, m in layers)


def test_sparsify_and_fuse_relu_keep_the_function():
    nn_mod = pytest.importorskip("adsparse.nn")
    torch.manual_seed(3)
    model = DLRM(13, SIZES, 16, [40, 16], [33, 1])
    dense, sparse = _inputs(9, 13, SIZES, seed=4)
    sparse_model = nn_mod.sparsify_(copy.deepcopy(model), density=0.5, block_size=(16, 16))
    assert all(isinstance(m, nn_mod.BlockSparseLinear) for _, m in mlp_layers(sparse_model))
    # The same function as the dense model with its weights masked to the kept blocks.
    masked = copy.deepcopy(model)
    for (fqn, layer), (_, packed) in zip(mlp_layers(masked), mlp_layers(sparse_model)):
        with torch.no_grad():
            layer.weight.copy_(packed.to_dense().weight)
        assert fqn
    expected = masked(dense, sparse)
    torch.testing.assert_close(sparse_model(dense, sparse), expected, rtol=1e-5, atol=1e-5)
    fuse_relu_(sparse_model)
    assert not any(isinstance(m, nn.ReLU) for m in sparse_model.modules())
    assert sparse_model.top_mlp[0].activation == "relu"
    assert sparse_model.top_mlp[2].activation is None  # the logit layer has no ReLU after it
    torch.testing.assert_close(sparse_model(dense, sparse), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="embedding_dim"):
        DLRM(3, SIZES, 4, [8, 5], [1])
    with pytest.raises(ValueError, match="top_mlp"):
        DLRM(3, SIZES, 4, [4], [8, 2])
    model = DLRM(3, SIZES, 4, [4], [1])
    dense, sparse = _inputs(2, 3, SIZES)
    with pytest.raises(ValueError, match="dense"):
        model(dense[:, :2], sparse)
    with pytest.raises(ValueError, match="sparse"):
        model(dense, sparse[:, :2])
    with pytest.raises(ValueError, match="rows"):
        model(dense[:1], sparse)


def test_sparse_embedding_gradients():
    torch.manual_seed(5)
    model = DLRM(4, SIZES, 5, [5], [1], sparse_grad=True)
    dense, sparse = _inputs(8, 4, SIZES, seed=6)
    model(dense, sparse).sum().backward()
    grad = model.embeddings[1].weight.grad
    assert grad.is_sparse
    dense_twin = DLRM(4, SIZES, 5, [5], [1])
    dense_twin.load_state_dict(model.state_dict())
    dense_twin(dense, sparse).sum().backward()
    torch.testing.assert_close(grad.to_dense(), dense_twin.embeddings[1].weight.grad)
