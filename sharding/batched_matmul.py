"""`fp::batched_matmul`: a matmul over any number of shared batch dims, kept whole by the trace.

torch lowers `q @ k.transpose(-1, -2)` on [b, h, s, d] operands to a reshape to [b*h, s, d], a
`bmm` and a reshape back; the merge puts the head dim behind the batch dim, where a split on
heads (tensor parallelism) cannot survive without a gather. JAX's `dot_general` keeps its batch
dims apart; this op does the same, so the head split carries through by the matmul rule (every
batch dim is a letter of its own). While tracing, `torch.matmul` / `@` of two operands of at
least 4 dims with equal batch shapes becomes this op (its gradient too); anything else is
torch's own matmul.
"""
from __future__ import annotations

import torch

from .marker_ops import _LIBRARY

_LIBRARY.define("batched_matmul(Tensor a, Tensor b) -> Tensor")
_LIBRARY.impl("batched_matmul", lambda a, b: torch.matmul(a, b), "CompositeExplicitAutograd")
BATCHED_MATMUL = torch.ops.fp.batched_matmul.default


class _BatchedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(a, b):
        return BATCHED_MATMUL(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _BatchedMatmul.apply(grad, b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        grad_b = _BatchedMatmul.apply(a.transpose(-1, -2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def keeps_batch_dims(a, b) -> bool:
    """Operands whose matmul torch would flatten: both at least 4-D with the same batch shape."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 4
            and a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2])


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class KeepBatchDims(torch.overrides.TorchFunctionMode):
    """While tracing: `torch.matmul` / `@` with batch dims to keep becomes `fp::batched_matmul`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and not kwargs and len(args) == 2 and keeps_batch_dims(*args):
            return _BatchedMatmul.apply(*args)
        return func(*args, **kwargs)
