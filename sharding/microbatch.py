"""`microbatch(i)`: mark the ops of micro-batch i while a step is traced, so a pipeline can schedule them.

A step that accumulates gradients over micro-batches (the project's `train_step` with
`grad_accum`) runs each one's forward, backward and gradient sum under `microbatch(i)`; the
traced nodes carry the index (`meta["custom"]["microbatch"]`, torch's own node annotation) and the
pipeline pass (`sharding.stages`) reads it. Outside a trace it does nothing.
"""
from __future__ import annotations

import contextlib

import torch.fx.traceback as fx_traceback

KEY = "microbatch"


@contextlib.contextmanager
def microbatch(index: int):
    if not isinstance(index, int) or index < 0:
        raise TypeError(f"microbatch(index) takes an int >= 0, got {index!r}")
    with fx_traceback.annotate({KEY: index}):
        yield


def microbatch_of(node) -> int | None:
    """The micro-batch a traced node belongs to, or None (outside every `microbatch` block)."""
    return (node.meta.get("custom") or {}).get(KEY)
