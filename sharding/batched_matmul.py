"""`fp::batched_matmul`: a matmul over any number of shared batch dims, kept whole by the trace.

torch lowers `q @ k.transpose(-1, -2)` on [b, h, s, d] operands to a reshape to [b*h, s, d], a
`bmm` and a reshape back; the merge puts the head dim behind the batch dim, where a split on
heads (tensor parallelism) cannot survive without a gather. JAX's `dot_general` keeps its batch
dims apart; this op does the same, so the head split carries through by the matmul rule (every
batch dim is a letter of its own). While tracing, `torch.matmul` / `@` of two operands of at
least 4 dims with equal batch shapes becomes this op (its gradient too).

`fp::leading_matmul` is the same idea for a projection: `x @ w` with x [..., k] of at least 3 dims
and w [k, n]. torch flattens x to [prod(...), k] first, which merges the sequence dim behind the
batch, so a sequence split (Ulysses, ring attention) could not cross a projection without a
gather. Kept whole, every leading dim is a letter; the weight gradient `fp::leading_contract`
contracts all of them at once. Anything else is torch's own matmul.
"""
from __future__ import annotations

import torch

from .marker_ops import _LIBRARY

_LIBRARY.define("batched_matmul(Tensor a, Tensor b) -> Tensor")
_LIBRARY.impl("batched_matmul", lambda a, b: torch.matmul(a, b), "CompositeExplicitAutograd")
BATCHED_MATMUL = torch.ops.fp.batched_matmul.default


def _contraction(name: str, op, gradients):
    """An autograd.Function computing `op(a, b)`; `gradients(a, b, grad)` gives (grad_a, grad_b) as
    thunks, each called only when its input needs a gradient."""

    class Contraction(torch.autograd.Function):
        @staticmethod
        def forward(a, b):
            return op(a, b)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            grad_a, grad_b = gradients(a, b, grad)
            return (grad_a() if ctx.needs_input_grad[0] else None, grad_b() if ctx.needs_input_grad[1] else None)

    Contraction.__name__ = Contraction.__qualname__ = name
    return Contraction


def _leading_contract(a, b):
    return a.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])


_LIBRARY.define("leading_matmul(Tensor a, Tensor b) -> Tensor")
_LIBRARY.impl("leading_matmul", lambda a, b: torch.matmul(a, b), "CompositeExplicitAutograd")
LEADING_MATMUL = torch.ops.fp.leading_matmul.default
_LIBRARY.define("leading_contract(Tensor a, Tensor b) -> Tensor")
_LIBRARY.impl("leading_contract", _leading_contract, "CompositeExplicitAutograd")
LEADING_CONTRACT = torch.ops.fp.leading_contract.default
# Ops recorded from inside an autograd.Function's forward (their backward is the Function's).
FUNCTION_OPS = frozenset({BATCHED_MATMUL, LEADING_MATMUL, LEADING_CONTRACT})

# [b..., m, k] @ [b..., k, n] with the batch dims kept apart.
_BatchedMatmul = _contraction("_BatchedMatmul", BATCHED_MATMUL, lambda a, b, grad: (
    lambda: _BatchedMatmul.apply(grad, b.transpose(-1, -2)), lambda: _BatchedMatmul.apply(a.transpose(-1, -2), grad)))
# [..., k] @ [k, n] -> [..., n] with the leading dims kept apart.
_LeadingMatmul = _contraction("_LeadingMatmul", LEADING_MATMUL, lambda a, b, grad: (
    lambda: _LeadingMatmul.apply(grad, b.t()), lambda: _LeadingContract.apply(a, grad)))
# [..., k] x [..., n] -> [k, n], summed over every leading dim (a projection's weight gradient).
_LeadingContract = _contraction("_LeadingContract", LEADING_CONTRACT, lambda a, b, grad: (
    lambda: _LeadingMatmul.apply(b, grad.t()), lambda: _LeadingMatmul.apply(a, grad)))


def keeps_leading_dims(a, b) -> bool:
    """A projection torch would flatten: a of at least 3 dims times a 2-D b."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 3 and b.dim() == 2


def keeps_batch_dims(a, b) -> bool:
    """Operands whose matmul torch would flatten: both at least 4-D with the same batch shape."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 4
            and a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2])


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class KeepBatchDims(torch.overrides.TorchFunctionMode):
    """While tracing: `torch.matmul` / `@` with batch or leading dims to keep becomes an `fp::` matmul."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and not kwargs and len(args) == 2:
            if keeps_batch_dims(*args):
                return _BatchedMatmul.apply(*args)
            if keeps_leading_dims(*args):
                return _LeadingMatmul.apply(*args)
        return func(*args, **kwargs)
