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
from .spec import P, chunked, striped

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


def _encode_axis(axis: str) -> str:
    return f"{axis}@{axis.chunks}" if isinstance(axis, chunked) else str(axis)


def _decode_axis(text: str) -> str:
    axis, _, chunks = text.partition("@")
    if not chunks:
        return axis
    return striped(axis) if chunks == "0" else chunked(axis, int(chunks))


def encode_spec(spec: P) -> str:
    """P -> the custom op's string argument: dims joined by ",", "" replicated, "dp+tp" a tuple,
    "tp@3" chunked("tp", 3), "cp@0" striped("cp")."""
    return ",".join("+".join(_encode_axis(a) for a in spec.axes_of(d)) for d in range(len(spec)))


KEEP_OTHER_AXES = ";keep"  # suffix: mesh axes the spec does not name keep their propagated layout


def keeps_other_axes(encoded: str) -> bool:
    return encoded.endswith(KEEP_OTHER_AXES)


def decode_spec(encoded: str) -> P:
    encoded = encoded.removesuffix(KEEP_OTHER_AXES)
    if not encoded:
        return P()
    return P(*[tuple(_decode_axis(a) for a in e.split("+")) if e else None for e in encoded.split(",")])


def resolve_logical(axes: Sequence[str | None], logical_rules: Mapping[str, object]) -> P:
    """Map logical axis names (batch, seq, embed, ...) to mesh axes; unknown names replicate.

    A mesh axis goes to the first dim that names it, as for parameters: Ulysses maps both `heads`
    and `attention_seq` to `sp`, and q's (batch, heads, attention_seq) is split on its heads while
    the attention output's (batch, attention_seq, heads) is split on its sequence."""
    entries, used = [], set()
    for name in axes:
        mapped = None if name is None else logical_rules.get(name)
        mapped = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        kept = tuple(a for a in mapped if a not in used)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*entries)


# Its gradient carries the same constraint (Megatron's SP needs it for the residual stream's gradient).
CONSTRAIN, _constrain = define_identity("constrain", "spec", mark_gradient=True)


def constrain(x: torch.Tensor, spec: P | Sequence[str | None], *, other_axes: str = "replicate") -> torch.Tensor:
    """Ask that `x` have layout `spec` (a `P`, or a tuple of logical axis names).

    Identity outside `jit`. Logical names resolve against the `logical_rules` given to `jit`;
    names without a rule are replicated. `other_axes="keep"` constrains only the mesh axes `spec`
    names: on every other axis `x` keeps the layout propagation gives it (a layout change a model
    states for strategies that map its names, a no-op for the rest: attention's head-major and
    token-major layouts, which only Ulysses maps to one axis).
    """
    if other_axes not in ("replicate", "keep"):
        raise ValueError(f"constrain: other_axes must be 'replicate' or 'keep', got {other_axes!r}")
    context = _TRACE_CONTEXT.get()
    if context is None:
        return x
    if not isinstance(spec, P):
        spec = resolve_logical(spec, context["logical_rules"])
    spec = P(*[e for e in spec][: x.dim()])
    return _constrain(x, encode_spec(spec) + (KEEP_OTHER_AXES if other_axes == "keep" else ""))
