"""Identity ops that leave a named mark in a traced graph: `fp::constrain`, `fp::checkpoint_name`.

Each is a plain op `fp::<name>(Tensor x, str <argument>) -> Tensor` (a copy when run eagerly) whose
gradient comes from a `torch.autograd.Function`, the functorch-compatible way in torch 2.13 (a
`custom_op` autograd registration is not). The gradient either carries the same mark (a sharding
constraint holds for the gradient too) or passes through unmarked.
"""
from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("fp", "DEF")


def define_identity(name: str, argument: str, mark_gradient: bool) -> tuple[torch._ops.OpOverload, Callable]:
    """Define `fp::<name>`; return (its OpOverload, `apply(x, value)` that records it with its gradient)."""
    _LIBRARY.define(f"{name}(Tensor x, str {argument}) -> Tensor")
    _LIBRARY.impl(name, lambda x, value: x.clone(), "CompositeExplicitAutograd")
    op = getattr(torch.ops.fp, name)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(x, value):
            return op(x, value)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.value = inputs[1]

        @staticmethod
        def backward(ctx, grad):
            return (op(grad, ctx.value) if mark_gradient else grad), None

    Identity.__name__ = Identity.__qualname__ = f"_{name}"
    return op.default, Identity.apply
