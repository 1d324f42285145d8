"""oneDNN matrix products for the model's Linear layers on the CPU.

PyTorch sends fp32 `nn.Linear` on the CPU to MKL. On AMD processors MKL takes slower code paths:
on this project's machines (AMD EPYC, 2 cores) oneDNN, which PyTorch also ships, computes the
same fp32 products about 2x faster for training-sized matrices and 2-4x faster for the few-row
products of decoding (experiments/benchmarks/). The swap changes the kernel, not the maths: the
parameters, their names and the state dict stay those of `nn.Linear`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor

_enabled = False  # set by use_onednn_on_cpu (from hardware.onednn_linears)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_on_cpu(enabled: bool = True) -> bool:
    """Process-wide switch for `linear` and `generate`; returns whether oneDNN is now in use."""
    global _enabled
    _enabled = enabled and onednn_available()
    return _enabled


def onednn_enabled() -> bool:
    return _enabled


def _suits_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not x.is_cpu or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu"):
        return False  # under autocast, nn.Linear's own dtype rules apply
    if isinstance(weight, DTensor) or isinstance(x, DTensor):
        return False  # tensor parallelism's sharded weights: DTensor has no rule for oneDNN's op
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # needs AVX-512 BF16-capable cores
    return x.dtype == torch.float32


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN; a (..., k), b (n, k)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _onednn_mm(x, weight)

    @staticmethod
    @once_differentiable  # no double backward: fail loudly rather than return wrong gradients
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(grad_out, weight.t().contiguous())  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            rows_out = grad_out.reshape(-1, grad_out.shape[-1])  # (M, out)
            rows_in = x.reshape(-1, x.shape[-1])  # (M, in)
            if weight.shape[0] >= _TRANSPOSE_COSTS_MORE * weight.shape[1]:
                # A small model's LM head: transposing the (M, vocab) gradient for oneDNN costs more
                # than MKL's slower product, which reads it in place.
                grad_w = torch.mm(rows_out.t(), rows_in)
            else:
                grad_w = _onednn_mm(rows_out.t().contiguous(), rows_in.t().contiguous())  # (out, M) @ (M, in)
        return grad_x, grad_w


# out_features / in_features from which the weight gradient is cheaper through MKL (measured on
# this project's CPUs: a 32000 x 256 head 79 ms vs 112 ms at M = 1024; 32000 x 1024 is faster in oneDNN).
_TRANSPOSE_COSTS_MORE = 64


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for callers that need no gradient: oneDNN when switched on, else F.linear."""
    if _enabled and _suits_onednn(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _OneDNNLinearFn.apply(x, weight)
        return _onednn_mm(x, weight)
    return F.linear(x, weight)


class PackedWeight(NamedTuple):
    source: torch.Tensor  # the weight it was made from
    version: int  # the weight's version counter then
    tensor: torch.Tensor  # pack_weight(source)


class OneDNNLinear(nn.Linear):
    """nn.Linear whose product runs through oneDNN for CPU fp32/bf16 inputs (no bias).

    `packed`, set only inside `onednn_linears(model, pack=True)`, holds the weight in oneDNN's blocked
    layout for products that need no gradient (decoding). It is used only while `weight` is the
    tensor it was packed from, at the same version: a replaced or updated weight is read as it is.
    """

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.bias is None and _suits_onednn(x, weight):
            if not torch.is_grad_enabled():  # inference: skip the autograd.Function machinery
                packed = self.packed
                fresh = packed is not None and packed.source is weight and packed.version == weight._version
                return _onednn_mm(x, packed.tensor if fresh else weight)
            return _OneDNNLinearFn.apply(x, weight)
        return F.linear(x, weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Run every bias-free nn.Linear of `model` through oneDNN; returns how many were switched.

    The module's class is switched in place (same parameters, hooks and state-dict names), so it
    works before or after an optimizer was built. A no-op where oneDNN is unavailable.
    """
    if not onednn_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = OneDNNLinear
            switched += 1
    return switched


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout (an opaque tensor only oneDNN products read).

    Plain row-major weights leave oneDNN's few-row products (decoding) at about 30 GB/s of the
    memory's 55 on this project's CPUs, and slower still at 8 rows; packed, a decode step of the
    benchmark model takes 20-30% less time, with the same results (experiments/benchmarks/decode.py).
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


@contextmanager
def onednn_linears(model: nn.Module, pack: bool = False):
    """use_onednn_linears for the duration of a block, then the layers are plain nn.Linear again.

    pack=True (for a block that computes no gradient and does not change the weights: generation)
    also keeps a packed copy of each weight (pack_weight) for the block's duration: as many bytes
    again as the weights, freed on exit, so no copy outlives the block. Within it, a weight changed
    in place or replaced is seen (the copy is then ignored), but not one written through `.data`,
    which moves no version counter: do not do that inside the block.
    """
    before = {module for module in model.modules() if type(module) is OneDNNLinear}
    use_onednn_linears(model)
    switched = [module for module in model.modules() if type(module) is OneDNNLinear]
    packed_here = []  # by this block: an enclosing block's packed weights stay its own
    try:
        for module in switched if pack else []:
            # Inference tensors (made under torch.inference_mode) keep no version counter to check.
            weight = module.weight
            if module.packed is None and not weight.is_inference() and _suits_onednn(weight, weight):
                module.packed = PackedWeight(module.weight, module.weight._version, pack_weight(module.weight))
                packed_here.append(module)
        yield model
    finally:
        for module in packed_here:
            del module.packed
        for module in switched:
            if module not in before:
                module.__class__ = nn.Linear
