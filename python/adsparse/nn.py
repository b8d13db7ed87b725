"""Sparse linear modules that drop into PyTorch models, and ``sparsify_`` / ``densify_``.

* :class:`SparseLinear`: a dense ``weight`` plus a ``mask`` buffer (per element or per block),
  run through the masked kernel. The form a layer has while its mask is being chosen.
* :class:`BlockSparseLinear`: only the stored blocks, packed (``values`` Parameter plus index
  buffers), run through the block-sparse kernel. Trainable with its pattern fixed (optimizer state
  exists only for stored blocks) and servable.

Both are plain modules: no hooks, no parametrizations, so they deepcopy, pickle and compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from adsparse import ops, serving_ops
from adsparse.checks import check_block_size, check_density
from adsparse.layout import (
    BlockSparseWeight,
    block_mask_for_density,
    block_norms,
    block_weight_counts,
)

__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "changed_buffer",
    "densify_",
    "expand_block_mask",
    "prunable_layers",
    "replace_layer",
    "sparsify_",
]

_INDEX_BUFFERS = ("row_offsets", "col_indices", "t_row_offsets", "t_col_indices", "t_block_ids")
_GRANULARITIES = ("block", "element")


def expand_block_mask(mask: torch.Tensor, block_size: tuple[int, int],
                      shape: tuple[int, int]) -> torch.Tensor:
    """The element-wise ``[N, K]`` mask that a block-grid mask stands for."""
    bn, bk = block_size
    n, k = shape
    return mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]


def _top_blocks(dense: torch.Tensor, block_size: tuple[int, int], density: float) -> torch.Tensor:
    """Block mask of the ``round(density * blocks)`` blocks of largest norm, and at least one:
    ``Linear(64, 1)`` at density 0.1 would otherwise keep round(0.4) = 0 blocks, silently
    leaving only the bias (``Pruner`` refuses such a target; a module-level call keeps one)."""
    scores = block_norms(dense, block_size)
    mask = block_mask_for_density(scores, density)
    if not bool(mask.any()):
        mask.view(-1)[int(scores.flatten().argmax())] = True
    return mask


def changed_buffer(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str,
                   names: tuple[str, ...]) -> str | None:
    """The first of ``names`` whose tensor in ``state_dict`` differs from the module's buffer
    (a checkpoint of another sparsity pattern must not load silently), else ``None``."""
    for name in names:
        saved = state_dict.get(prefix + name)
        if saved is not None and not torch.equal(saved.cpu(), getattr(module, name).cpu()):
            return name
    return None


class SparseLinear(nn.Module):
    """``y = x @ (weight * mask).T + bias`` through the masked kernel.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        block_size: ``(bn, bk)`` rows x columns of a mask block (``granularity="block"``).
        granularity: ``"block"`` (mask ``[ceil(N/bn), ceil(K/bk)]``, what the block-sparse
            kernels accelerate) or ``"element"`` (mask ``[N, K]``, unstructured).

    The mask is a float buffer with values in [0, 1] (0/1 once a pruner hardened it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size: tuple[int, int] | int = (16, 16), granularity: str = "block",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"features must be >= 1, got {(in_features, out_features)}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block_size = check_block_size(block_size)
        self.granularity = granularity
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(ref.weight.detach())
        self.bias = nn.Parameter(ref.bias.detach()) if bias else None
        self.register_buffer("mask", torch.ones(self.mask_shape, device=self.weight.device,
                                                dtype=self.weight.dtype))

    @property
    def mask_shape(self) -> tuple[int, int]:
        if self.granularity == "element":
            return self.out_features, self.in_features
        bn, bk = self.block_size
        return math.ceil(self.out_features / bn), math.ceil(self.in_features / bk)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: tuple[int, int] | int = (16, 16),
                    granularity: str = "block", mask: torch.Tensor | None = None) -> SparseLinear:
        """Wrap an ``nn.Linear``'s parameters (shared, not copied) with a given or all-ones mask."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    block_size=block_size, granularity=granularity, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.mask = torch.ones(layer.mask_shape, device=linear.weight.device,
                                dtype=linear.weight.dtype)
        if mask is not None:
            layer.set_mask(mask)
        return layer

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (copied, cast to the weight's dtype and device)."""
        if tuple(mask.shape) != self.mask_shape:
            raise ValueError(
                f"mask must be {self.mask_shape} for {self!r}, got {tuple(mask.shape)}"
            )
        self.mask = mask.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()

    def element_mask(self) -> torch.Tensor:
        """The mask as ``[N, K]``."""
        if self.granularity == "element":
            return self.mask
        return expand_block_mask(self.mask, self.block_size, (self.out_features, self.in_features))

    def masked_weight(self) -> torch.Tensor:
        """``weight * mask`` as a dense ``[N, K]`` tensor (for export and references)."""
        return self.weight * self.element_mask()

    @property
    def density(self) -> float:
        """Share of the ``N*K`` weights whose mask is nonzero."""
        if self.granularity == "element":
            return float((self.mask != 0).float().mean())
        counts = block_weight_counts((self.out_features, self.in_features), self.block_size)
        kept = counts.to(self.mask.device)[self.mask != 0].sum()
        return float(kept) / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = None if self.granularity == "element" else self.block_size
        return ops.masked_linear(x, self.weight, self.mask, self.bias, block_size=block)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, granularity={self.granularity}, "
                f"block_size={self.block_size}, density={self.density:.4f}")


class BlockSparseLinear(nn.Module):
    """``y = act(x @ W.T + bias)`` with only the stored blocks of ``W`` kept, packed.

    ``values`` is the trainable Parameter ``[nnzb, bn, bk]``; the index lives in buffers, so the
    pattern is fixed until the module is rebuilt. Build with :meth:`from_dense`.
    """

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None = None,
                 activation: str | None = None):
        super().__init__()
        if not isinstance(weight, BlockSparseWeight):
            raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
        ops._activation_code(activation)
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block_size
        self.activation = activation
        self.values = nn.Parameter(weight.values.detach().clone())
        for name in _INDEX_BUFFERS:
            self.register_buffer(name, getattr(weight, name).clone())
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.bias = None

    @classmethod
    def from_dense(cls, linear: nn.Linear | SparseLinear, mask: torch.Tensor | None = None,
                   density: float | None = None, block_size: tuple[int, int] | int = (16, 16),
                   activation: str | None = None) -> BlockSparseLinear:
        """Pack an ``nn.Linear`` or a ``SparseLinear``.

        The blocks kept are given by a block-grid ``mask``, else the ``density`` share of blocks
        of largest norm (at least one block, so a small layer never loses all its weights),
        else (for a block ``SparseLinear`` with the same block size) the layer's own mask, else
        all blocks. A ``SparseLinear`` contributes ``weight * mask``.
        """
        block_size = check_block_size(block_size)
        if isinstance(linear, SparseLinear):
            dense = linear.masked_weight()
            if mask is None and density is None and linear.granularity == "block":
                if linear.block_size != block_size:
                    raise ValueError(
                        f"SparseLinear has block size {linear.block_size}, asked for {block_size}"
                    )
                mask = linear.mask != 0
        elif isinstance(linear, nn.Linear):
            dense = linear.weight
        else:
            raise TypeError(f"expected nn.Linear or SparseLinear, got {type(linear).__name__}")
        if density is not None:
            density = check_density(density)
            if mask is None:
                mask, density = _top_blocks(dense.detach(), block_size, density), None
        weight = BlockSparseWeight.from_dense(dense.detach(), block_size, mask=mask,
                                              density=density)
        return cls(weight, None if linear.bias is None else linear.bias.detach(), activation)

    def weight(self) -> BlockSparseWeight:
        """The packed weight (sharing this module's tensors)."""
        return BlockSparseWeight(self.values, self.row_offsets, self.col_indices,
                                 (self.out_features, self.in_features), self.t_row_offsets,
                                 self.t_col_indices, self.t_block_ids, check=False)

    def block_mask(self) -> torch.Tensor:
        """Boolean block grid of the stored blocks."""
        return self.weight().block_mask()

    @property
    def density(self) -> float:
        """Share of the ``N*K`` weights inside stored blocks."""
        return self.weight().density

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (zeros outside the stored blocks)."""
        if self.activation is not None:
            raise ValueError("to_dense() of a layer with a fused activation has no nn.Linear form")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
                and x.is_cpu and serving_ops.CPP_CPU):
            # The small-batch path: the serving kernel with the forward index only (no
            # transposed index, no autograd), through its lean entry (no dispatcher), which
            # checks the arguments. (Dynamo cannot trace is_inference_mode_enabled; a compiled
            # graph has no per-call overhead to save.) The tensors come straight from the
            # module's dicts: each nn.Module.__getattr__ costs about as much as the rest of this
            # branch.
            if serving_ops.direct_call_ok(x, self.in_features):
                params, buffers = self._parameters, self._buffers
                return serving_ops.serve_direct(
                    x, params["values"], None, buffers["row_offsets"], buffers["col_indices"],
                    params.get("bias"), self.out_features, *self.block_size,
                    ops.ACTIVATIONS[self.activation])
            return serving_ops.bsr_linear_serve(
                x, self.values, None, self.row_offsets, self.col_indices,
                (self.out_features, self.in_features), self.block_size, self.bias,
                self.activation,
            )
        return ops.bsr_linear_indexed(
            x, self.values, self.row_offsets, self.col_indices, self.t_row_offsets,
            self.t_col_indices, self.t_block_ids, (self.out_features, self.in_features),
            self.bias, self.activation,
        )

    # The pattern is part of the module's identity: loading another one must fail loudly.
    def get_extra_state(self) -> dict:
        return {"shape": (self.out_features, self.in_features), "block_size": self.block_size,
                "activation": self.activation}

    def set_extra_state(self, state: dict) -> None:  # checked in _load_from_state_dict
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layer = prefix.rstrip(".") or "<root>"
        extra = state_dict.get(prefix + "_extra_state")
        mine = self.get_extra_state()
        if extra is not None and (tuple(extra["shape"]) != mine["shape"]
                                  or tuple(extra["block_size"]) != mine["block_size"]):
            error_msgs.append(
                f"BlockSparseLinear {layer}: checkpoint has shape {tuple(extra['shape'])} and "
                f"block {tuple(extra['block_size'])}, module has {mine['shape']} and "
                f"{mine['block_size']}"
            )
            return
        if extra is not None and extra.get("activation") != mine["activation"]:
            error_msgs.append(
                f"BlockSparseLinear {layer}: checkpoint has activation {extra.get('activation')!r},"
                f" module has {mine['activation']!r}"
            )
            return
        # All five index tensors: the transposed index (t_*) drives the input gradient, so a
        # checkpoint whose t_* disagree with its own forward index must not load silently.
        name = changed_buffer(self, state_dict, prefix, _INDEX_BUFFERS)
        if name is not None:
            what = ("sparsity pattern" if name in ("row_offsets", "col_indices")
                    else "transposed index")
            error_msgs.append(
                f"BlockSparseLinear {layer}: the checkpoint's {what} ({name}) "
                "differs from the module's; rebuild the module with "
                "adsparse.nn.load_sparse_state_dict (which also validates the index)"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, density={self.density:.4f}, "
                f"bias={self.bias is not None}{act}")


# --------------------------------------------------------------------------- model-level
FilterFn = Callable[[nn.Module, str], bool]


def prunable_layers(
    model: nn.Module,
    filter_fn: FilterFn | None = None,
    types: tuple[type, ...] = (nn.Linear, SparseLinear),
) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every layer of ``types`` selected by ``filter_fn(module, fqn)``."""
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(m, types) and (filter_fn is None or filter_fn(m, fqn))]


def replace_layer(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` in every place that holds ``old``, so a layer used twice (tied weights,
    ``Sequential(l, ReLU(), l)``) stays one shared layer; returns the (possibly new) root."""
    if model is old:
        return new
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)
    return model


def _names(model: nn.Module, types: tuple[type, ...]) -> dict[int, list[str]]:
    """Every name of every layer of ``types``, by layer identity (a shared layer has several)."""
    names: dict[int, list[str]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, types):
            names.setdefault(id(m), []).append(fqn)
    return names


def sparsify_(model: nn.Module, density: float | None = None,
              masks: Mapping[str, torch.Tensor] | None = None,
              block_size: tuple[int, int] | int = (16, 16),
              filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace, in place, ``nn.Linear``/``SparseLinear`` layers by :class:`BlockSparseLinear`.

    With ``masks`` (``{fqn: block-grid mask}``, e.g. from a pruner) exactly those layers are
    replaced; otherwise every layer selected by ``filter_fn(module, fqn)`` is, keeping the
    ``density`` share of blocks of largest norm (or, for a block ``SparseLinear``, its own mask).
    With ``density``, every layer keeps at least its one largest block, however small the layer
    (``Linear(64, 1)`` at density 0.1 has 4 blocks of 16 columns: 0.4 rounds to 1, not 0).
    A layer used in several places (tied weights) becomes one shared ``BlockSparseLinear`` in
    all of them; ``masks`` may name it by any of its names (with equal masks).
    Returns the model (a bare ``nn.Linear`` passed as ``model`` is returned replaced).
    """
    names = _names(model, (nn.Linear, SparseLinear))
    if masks is not None:
        unknown = sorted(set(masks) - {fqn for aliases in names.values() for fqn in aliases})
        if unknown:
            raise ValueError(f"masks name layers that are not nn.Linear/SparseLinear: {unknown}")
    selected = prunable_layers(model, filter_fn)
    chosen: dict[str, torch.Tensor | None] = {}
    for fqn, module in selected:
        given = [] if masks is None else [a for a in names[id(module)] if a in masks]
        if masks is None:
            chosen[fqn] = None
        elif given:
            if any(not torch.equal(masks[a], masks[given[0]]) for a in given[1:]):
                raise ValueError(f"layer shared as {given} is given different masks")
            chosen[fqn] = masks[given[0]]
    selected = [(fqn, m) for fqn, m in selected if fqn in chosen]
    if masks is None and density is None:
        plain = [fqn for fqn, m in selected if not isinstance(m, SparseLinear)]
        if plain:
            raise ValueError(f"give density or masks to sparsify nn.Linear layers {plain}")
    for fqn, module in selected:
        mask = chosen[fqn]
        element = isinstance(module, SparseLinear) and module.granularity == "element"
        if mask is not None and element:
            raise ValueError(f"layer {fqn!r} has an element mask; block-sparse needs a block mask")
        try:
            new = BlockSparseLinear.from_dense(module, mask=mask, density=density,
                                               block_size=block_size)
        except ValueError as err:
            raise ValueError(f"layer {fqn!r}: {err}") from err
        model = replace_layer(model, module, new)
    return model


def densify_(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace every :class:`BlockSparseLinear` by the equivalent ``nn.Linear``, in place
    (a layer used in several places becomes one shared ``nn.Linear``)."""
    for _, module in prunable_layers(model, filter_fn, types=(BlockSparseLinear,)):
        model = replace_layer(model, module, module.to_dense())
    return model


def load_sparse_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           strict: bool = True) -> nn.Module:
    """Load a state dict whose block-sparse patterns may differ from the model's.

    Every ``BlockSparseLinear`` named in ``state_dict`` is first rebuilt with the saved pattern
    (checkpoints of a run whose sparse model was regenerated), then the state is loaded.
    """
    for fqn, module in prunable_layers(model, types=(BlockSparseLinear,)):
        prefix = f"{fqn}." if fqn else ""
        if prefix + "values" not in state_dict:
            continue
        index = {name: state_dict[prefix + name] for name in _INDEX_BUFFERS}
        weight = BlockSparseWeight(state_dict[prefix + "values"], index["row_offsets"],
                                   index["col_indices"], (module.out_features, module.in_features),
                                   index["t_row_offsets"], index["t_col_indices"],
                                   index["t_block_ids"])
        bias = state_dict.get(prefix + "bias")
        new = BlockSparseLinear(weight, bias, module.activation).to(module.values.device)
        model = replace_layer(model, module, new)
    model.load_state_dict(state_dict, strict=strict)
    return model
