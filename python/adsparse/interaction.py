"""The DLRM's pairwise-dot interaction as one inference op: ``adsparse::dot_interaction``.

``dot_interaction(bottom, ids, tables, pair_index)`` returns ``[bottom, <v_i, v_j> per pair]``
with the F + 1 vectors of a row ``v_0 = bottom[b]`` and ``v_{f+1} = tables[f][ids[b, f]]``; pair
``p`` is ``(i, j) = divmod(pair_index[p], F + 1)`` (``adsparse.models.DLRM`` keeps that index as
its ``pair_index`` buffer). The C++ kernel (``csrc/interaction.cpp``) reads the table rows in
place and forms each row's dots in registers: one pass instead of F lookups, a stack of the
``[B, F+1, d]`` vectors, a batched Gram matrix, an upper-triangle gather and a concatenation.
CUDA tensors run the Triton kernel (``adsparse_kernels/interaction.py``).

Inference only, like the serving forms: a backward through it raises, and the DLRM uses it
only where no gradient is recorded (``torch.no_grad`` / ``torch.inference_mode``); training
keeps the composite path, whose gradients reach the tables.
"""

from __future__ import annotations

import torch

from adsparse import ops

__all__ = ["dot_interaction"]

_OPS = torch.ops.adsparse


def dot_interaction(bottom: torch.Tensor, ids: torch.Tensor, tables: list[torch.Tensor],
                    pair_index: torch.Tensor) -> torch.Tensor:
    """``[B, d + P]``: ``bottom`` ``[B, d]`` then the ``P`` pair dots (fp32). The kernel checks
    shapes, dtypes, ids against each table and the pair index's range."""
    ops._check_backend()
    return _OPS.dot_interaction(bottom, ids, list(tables), pair_index)


@torch.library.register_fake("adsparse::dot_interaction")
def _fake(bottom, ids, tables, pair_index):
    torch._check(bottom.dim() == 2)
    return bottom.new_empty(bottom.shape[0], bottom.shape[1] + pair_index.shape[0])


# The Triton kernel: adsparse_kernels/interaction.py.
ops.register_inference_only(
    "dot_interaction",
    "adsparse.dot_interaction is inference-only and has no gradient; call the DLRM with "
    "gradients enabled to train it (it then takes the composite interaction)")
