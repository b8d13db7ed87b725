"""Serving forms of block-sparse models: :class:`ServingBlockSparseLinear` and ``quantize_``.

``quantize_(model, dtype="int8" | "bf16")`` converts, in place, every selected
:class:`~adsparse.nn.BlockSparseLinear` into an inference-only :class:`ServingBlockSparseLinear`
holding the packed weight of that form (``adsparse.serving_ops.SERVING_DTYPES``). Inputs and
outputs stay fp32; bias and ReLU stay fused. The serving modules hold no Parameters (only
buffers), so an optimizer never sees them, and a backward that reaches one raises.

They are plain modules: ``state_dict``, ``torch.save``/``load``, ``deepcopy``,
``torch.compile(fullgraph=True)`` and ``torch.export`` work as for ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from adsparse import ops, serving_ops
from adsparse.layout import BlockSparseWeight
from adsparse.nn import (
    BlockSparseLinear,
    FilterFn,
    changed_buffer,
    prunable_layers,
    replace_layer,
)

__all__ = ["ServingBlockSparseLinear", "quantize_"]


class ServingBlockSparseLinear(nn.Module):
    """``y = act(x @ W.T + bias)`` over a packed int8 or bf16 block-sparse weight (inference only).

    Build with :meth:`from_block_sparse` (or ``quantize_``). ``weight`` is the packed weight
    (``serving_ops.pack_int8`` / ``pack_bf16``), ``scales`` the int8 form's per-output-channel
    scales (``None`` for bf16); the forward index and the bias are buffers too.
    """

    def __init__(self, form: str, weight: torch.Tensor, scales: torch.Tensor | None,
                 row_offsets: torch.Tensor, col_indices: torch.Tensor, shape: tuple[int, int],
                 block_size: tuple[int, int], bias: torch.Tensor | None = None,
                 activation: str | None = None):
        super().__init__()
        spec = serving_ops.check_serving_dtype(form)
        if weight.dtype != spec.dtype:
            raise ValueError(f"a {form} serving weight must be {spec.dtype}, got {weight.dtype}")
        if (scales is None) != (form != "int8"):
            raise ValueError("scales are required for int8 and only for int8")
        ops._activation_code(activation)
        self.form = form
        self.out_features, self.in_features = (int(s) for s in shape)
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.activation = activation
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("row_offsets", row_offsets)
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_block_sparse(cls, layer: BlockSparseLinear, dtype: str) -> ServingBlockSparseLinear:
        """The serving form ``dtype`` (a key of ``SERVING_DTYPES``) of a ``BlockSparseLinear``."""
        if not isinstance(layer, BlockSparseLinear):
            raise TypeError(f"expected BlockSparseLinear, got {type(layer).__name__}")
        spec = serving_ops.check_serving_dtype(dtype)
        if layer.values.dtype != torch.float32:
            raise ValueError(f"quantize_ needs float32 layers, got {layer.values.dtype}")
        packed, scales = spec.pack(layer.weight())
        return cls(dtype, packed, scales, layer.row_offsets.clone(), layer.col_indices.clone(),
                   (layer.out_features, layer.in_features), layer.block_size, layer.bias,
                   layer.activation)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> BlockSparseWeight:
        """The block-sparse weight this layer computes with, in ``dtype`` (for references)."""
        values = serving_ops.unpack(self.weight, self.scales, self.block_size).to(dtype)
        if self.scales is not None:
            bn = self.block_size[0]
            n = serving_ops.output_rows(self.row_offsets, bn)
            padded = torch.cat([self.scales, self.scales.new_ones(bn)]).to(dtype)
            values = values * padded[n][:, :, None]
        return BlockSparseWeight(values.contiguous(), self.row_offsets, self.col_indices,
                                 (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and serving_ops.direct_call_ok(x, self.in_features):
            # As BlockSparseLinear's inference path: the kernel's lean entry, its tensors
            # straight from the module's dict (each nn.Module.__getattr__ costs ~0.2 us).
            b = self._buffers
            return serving_ops.serve_direct(x, b["weight"], b["scales"], b["row_offsets"],
                                            b["col_indices"], b["bias"], self.out_features,
                                            *self.block_size, ops.ACTIVATIONS[self.activation])
        return serving_ops.bsr_linear_serve(
            x, self.weight, self.scales, self.row_offsets, self.col_indices,
            (self.out_features, self.in_features), self.block_size, self.bias, self.activation,
        )

    # The form, shape and pattern are the module's identity: loading another must fail loudly.
    def get_extra_state(self) -> dict:
        return {"form": self.form, "shape": (self.out_features, self.in_features),
                "block_size": self.block_size, "activation": self.activation}

    def set_extra_state(self, state: dict) -> None:  # checked in _load_from_state_dict
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layer = prefix.rstrip(".") or "<root>"
        extra = state_dict.get(prefix + "_extra_state")
        mine = self.get_extra_state()
        if extra is not None and any(
            (tuple(extra[key]) if isinstance(mine[key], tuple) else extra[key]) != mine[key]
            for key in mine
        ):
            error_msgs.append(f"ServingBlockSparseLinear {layer}: checkpoint is {extra}, module "
                              f"is {mine}")
            return
        name = changed_buffer(self, state_dict, prefix, ("row_offsets", "col_indices"))
        if name is not None:
            error_msgs.append(f"ServingBlockSparseLinear {layer}: the checkpoint's sparsity "
                              f"pattern ({name}) differs from the module's")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (f"form={self.form}, in_features={self.in_features}, "
                f"out_features={self.out_features}, block_size={self.block_size}, "
                f"blocks={self.col_indices.numel()}, bias={self.bias is not None}{act}")


def quantize_(model: nn.Module, dtype: str = "int8",
              filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace, in place, every ``BlockSparseLinear`` selected by ``filter_fn(module, fqn)`` by
    its serving form ``dtype`` (``"int8"`` or ``"bf16"``, see ``SERVING_DTYPES``).

    The result is inference-only. A layer used in several places becomes one shared serving
    layer. Returns the model (a bare ``BlockSparseLinear`` passed as ``model`` is returned
    replaced).
    """
    serving_ops.check_serving_dtype(dtype)
    for _, module in prunable_layers(model, filter_fn, types=(BlockSparseLinear,)):
        model = replace_layer(model, module,
                              ServingBlockSparseLinear.from_block_sparse(module, dtype))
    return model
