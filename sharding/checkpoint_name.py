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
from .marker_ops import define_identity

LAYER_INPUT = "layer_input"

CHECKPOINT_NAME, _checkpoint_name = define_identity("checkpoint_name", "name", mark_gradient=False)


def checkpoint_name(x: torch.Tensor, name: str) -> torch.Tensor:
    """Name `x` (e.g. `LAYER_INPUT`, the input of a transformer block) for `jit(..., remat=...)`."""
    if _TRACE_CONTEXT.get() is None:
        return x
    return _checkpoint_name(x, name)
