"""Triton kernels of the adsparse ops (the CUDA backend; CPU tensors via TRITON_INTERPRET=1).

Each public function has exactly the signature of the op schema of the same name in
csrc/registration.cpp, so python/adsparse/ops.py registers it as that op's kernel.
``CALLS`` counts the calls of each function in this process (tests use it to prove routing).
"""

from adsparse_kernels._common import CALLS
from adsparse_kernels.bsr_linear import (
    bsr_linear,
    bsr_linear_backward_input,
    bsr_linear_backward_weight,
)
from adsparse_kernels.interaction import dot_interaction
from adsparse_kernels.masked_linear import (
    masked_linear,
    masked_linear_backward_input,
    masked_linear_backward_params,
)
from adsparse_kernels.serving import bsr_linear_serve, quantize_rows

__all__ = [
    "CALLS",
    "bsr_linear",
    "bsr_linear_backward_input",
    "bsr_linear_backward_weight",
    "bsr_linear_serve",
    "dot_interaction",
    "masked_linear",
    "masked_linear_backward_input",
    "masked_linear_backward_params",
    "quantize_rows",
]
