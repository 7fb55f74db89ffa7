"""`checkpoint_name`: name an intermediate value for the activation-checkpointing pass, identity outside `jit`.

After JAX's `jax.ad_checkpoint.checkpoint_name`. Inside a `jit` trace the name becomes a
`fp::checkpoint_name` node; `sharding.remat` reads the names (the "full" policy keeps exactly
the named values and recomputes the rest of the forward in the backward) and then removes the
nodes, so the later stages never see them. The gradient passes through unchanged. Naming a
value is not parallelism: it says what the value is, the `remat` option says what to do.
"""
from __future__ import annotations

import torch

from .constrain import _TRACE_CONTEXT

LAYER_INPUT = "layer_input"

_LIBRARY = torch.library.Library("fp", "FRAGMENT")
_LIBRARY.define("checkpoint_name(Tensor x, str name) -> Tensor")
# As `fp::constrain`: a plain op, with a functorch-compatible gradient from `_CheckpointName`.
_LIBRARY.impl("checkpoint_name", lambda x, name: x.clone(), "CompositeExplicitAutograd")
CHECKPOINT_NAME = torch.ops.fp.checkpoint_name.default


class _CheckpointName(torch.autograd.Function):
    """Identity whose gradient is the incoming gradient (no node in the backward)."""

    @staticmethod
    def forward(x, name):
        return torch.ops.fp.checkpoint_name(x, name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def checkpoint_name(x: torch.Tensor, name: str) -> torch.Tensor:
    """Name `x` (e.g. `LAYER_INPUT`, the input of a transformer block) for `jit(..., remat=...)`."""
    if _TRACE_CONTEXT.get() is None:
        return x
    return _CheckpointName.apply(x, name)
