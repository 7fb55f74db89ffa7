"""Propagation rules, one op family per module, registered per aten op.

A rule decides, for one mesh axis at a time, which placement every tensor input must have
and which placement the output gets: `rule(ctx, node, axis) -> Choice`. Adding an op means
adding a rule here, never editing the propagator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

RULES: dict[object, Callable] = {}
# Rules that place `Strided` (chunked) splits themselves; every other rule sees such an input
# gathered first (correct, at the price of a gather).
STRIDED_AWARE: set[Callable] = set()


def handles_strided(fn: Callable) -> Callable:
    STRIDED_AWARE.add(fn)
    return fn


@dataclass
class Choice:
    """Required input placements (inputs not named keep theirs) and the output placement(s).

    `local` names a local computation that differs from the global op on this axis (the insert
    stage emits it): "vocab_parallel", a lookup in this rank's rows of a table split on dim 0."""

    output: object
    inputs: dict = field(default_factory=dict)
    local: str | None = None


def rule(*targets):
    """Register `fn` as the rule for every op overload (or packet: all its overloads) in `targets`."""

    def register(fn):
        for target in targets:
            if isinstance(target, torch._ops.OpOverloadPacket):
                for overload in target.overloads():
                    RULES[getattr(target, overload)] = fn
            else:
                RULES[target] = fn
        return fn

    return register


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Tensor-valued input nodes in argument order (lists such as `cat`'s flattened), deduplicated."""
    seen, out = set(), []

    def visit(arg):
        if isinstance(arg, torch.fx.Node):
            if arg not in seen:
                seen.add(arg)
                out.append(arg)
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                visit(a)

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


def load_all() -> None:
    """Import every rule module so its registrations run."""
    from . import along_dims, creation, elementwise, indexing, matmul, nn, reductions, views  # noqa: F401
