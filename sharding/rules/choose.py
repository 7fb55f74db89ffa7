"""Shared choices for rules: which operand stays put when two operands disagree on an axis.

Data axes move parameters (ZeRO: gather the weight, keep the batch split); model axes move
activations (TP/SP: the weight's shard is the point of the strategy). Ties go to the larger
tensor, so the smaller one moves; equal sizes go to the earlier operand.
"""
from __future__ import annotations

from ..layout import PARTIAL, REPLICATE, is_shard


def anchor(ctx, axis: int, nodes):
    """The operand whose placement on `axis` wins a conflict."""

    def rank(indexed):
        index, node = indexed
        param = ctx.param_like(node)
        preferred = (not param) if ctx.is_data_axis(axis) else param
        return (preferred, ctx.nbytes(node), -index)

    return max(enumerate(nodes), key=rank)[1]


def broadcast_dim(ctx, node, inp, out_dim: int):
    """The dim of `inp` aligned with output dim `out_dim` under broadcasting, or None if broadcast."""
    out_shape, in_shape = ctx.shape(node), ctx.shape(inp)
    dim = out_dim - (len(out_shape) - len(in_shape))
    if dim < 0 or in_shape[dim] != out_shape[out_dim]:
        return None
    return dim


def to_output_dim(ctx, node, inp, dim: int) -> int:
    return dim + len(ctx.shape(node)) - len(ctx.shape(inp))


__all__ = ["anchor", "broadcast_dim", "to_output_dim", "PARTIAL", "REPLICATE", "is_shard"]
