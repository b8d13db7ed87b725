"""Recommendation models whose MLP layers the sparse modules can replace."""

from adsparse.models.dlrm import (
    DLRM,
    PRESETS,
    dlrm_preset,
    fuse_relu_,
    interaction_features,
    mlp_layers,
)

__all__ = ["DLRM", "PRESETS", "dlrm_preset", "fuse_relu_", "interaction_features", "mlp_layers"]
