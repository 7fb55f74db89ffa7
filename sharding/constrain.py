"""`constrain`: a sharding constraint on an intermediate value, identity outside `jit`.

Inside a `jit` trace the constraint becomes a `fp::constrain` node in the graph; the
propagation pass treats it as a required layout (and its gradient carries the same
constraint, as Megatron's sequence parallelism needs for the residual stream's gradient).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Mapping, Sequence

import torch

from .marker_ops import define_identity
from .spec import P

# The active trace: logical-axis rules and mesh axis names, set only while `jit` traces.
_TRACE_CONTEXT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fp_trace_context", default=None)


@contextlib.contextmanager
def tracing_context(logical_rules: Mapping[str, object] | None, axis_names: Sequence[str]):
    """Make `constrain` emit graph nodes (used by the tracer only)."""
    token = _TRACE_CONTEXT.set({"logical_rules": dict(logical_rules or {}), "axis_names": tuple(axis_names)})
    try:
        yield
    finally:
        _TRACE_CONTEXT.reset(token)


def encode_spec(spec: P) -> str:
    """P -> the custom op's string argument: dims joined by ",", "" replicated, "dp+tp" a tuple."""
    return ",".join("+".join(spec.axes_of(d)) for d in range(len(spec)))


def decode_spec(encoded: str) -> P:
    if not encoded:
        return P()
    return P(*[tuple(e.split("+")) if e else None for e in encoded.split(",")])


def resolve_logical(axes: Sequence[str | None], logical_rules: Mapping[str, object]) -> P:
    """Map logical axis names (batch, seq, embed, ...) to mesh axes; unknown names replicate."""
    entries = []
    for name in axes:
        mapped = None if name is None else logical_rules.get(name)
        if isinstance(mapped, list):
            mapped = tuple(mapped)
        entries.append(mapped)
    return P(*entries)


# Its gradient carries the same constraint (Megatron's SP needs it for the residual stream's gradient).
CONSTRAIN, _constrain = define_identity("constrain", "spec", mark_gradient=True)


def constrain(x: torch.Tensor, spec: P | Sequence[str | None]) -> torch.Tensor:
    """Ask that `x` have layout `spec` (a `P`, or a tuple of logical axis names).

    Identity outside `jit`. Logical names resolve against the `logical_rules` given to `jit`;
    names without a rule are replicated.
    """
    context = _TRACE_CONTEXT.get()
    if context is None:
        return x
    if not isinstance(spec, P):
        spec = resolve_logical(spec, context["logical_rules"])
    spec = P(*[e for e in spec][: x.dim()])
    return _constrain(x, encode_spec(spec))
