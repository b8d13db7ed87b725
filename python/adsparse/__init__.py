"""adsparse: adaptive dense-to-sparse pruning for online recommendation models.

Block-sparse and masked linear ops with fast CPU (C++) and GPU (Triton) kernels, the modules
built on them, pruning that learns each layer's sparsity, and the online training loop that
compares the dense-to-sparse paradigms on a non-stationary stream.
"""

from adsparse import ops
from adsparse.layout import BlockSparseWeight
from adsparse.ops import bsr_linear, masked_linear

__version__ = "0.1.0"

__all__ = ["BlockSparseWeight", "bsr_linear", "masked_linear", "ops"]
