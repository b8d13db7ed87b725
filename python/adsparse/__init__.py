"""adsparse: adaptive dense-to-sparse pruning for online recommendation models.

Block-sparse and masked linear ops with fast CPU (C++) and GPU (Triton) kernels, the modules
built on them, pruning that learns each layer's sparsity, and the online training loop that
compares the dense-to-sparse paradigms on a non-stationary stream.
"""

import importlib

from adsparse import ops
from adsparse.layout import BlockSparseWeight
from adsparse.nn import (
    BlockSparseLinear,
    SparseLinear,
    densify_,
    load_sparse_state_dict,
    sparsify_,
)
from adsparse.ops import bsr_linear, masked_linear
from adsparse.quantize import ServingBlockSparseLinear, quantize_
from adsparse.serving_ops import SERVING_DTYPES

__version__ = "0.1.0"

__all__ = [
    "SERVING_DTYPES",
    "BlockSparseLinear",
    "BlockSparseWeight",
    "ServingBlockSparseLinear",
    "SparseLinear",
    "bsr_linear",
    "densify_",
    "load_sparse_state_dict",
    "masked_linear",
    "ops",
    "quantize_",
    "sparsify_",
]

# The upper layers load on first use (`adsparse.pruning`, `adsparse.online`, ...), so importing
# the ops and modules stays cheap.
_LAZY = ("pruning", "online", "data", "models", "metrics", "cli")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"adsparse.{name}")
    raise AttributeError(f"module 'adsparse' has no attribute {name!r}")
