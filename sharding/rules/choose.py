"""Shared choices for rules: which operand keeps its split when two operands disagree on an axis.

Rule 5: on a data axis the data keeps its split and parameters move (ZeRO: gather the weight,
keep the batch split); on a model axis the parameter keeps its split and activations move
(TP/SP: the weight's shard is the point of the strategy). When that does not single out one
split (two activations, or two parameters, split along different dims), nothing else decides:
the error names the `constrain` that does.
"""
from __future__ import annotations

from ..layout import PARTIAL, REPLICATE, is_shard, split_dim


def anchor(ctx, axis: int, node, nodes, placement_of=None, survives=None):
    """The operand whose split on `axis` wins a conflict (rule 5), or a PropagationError.

    `placement_of(operand)` gives the split each operand stands for (its dim in the output for
    pointwise ops); operands standing for the same split do not conflict. `survives(operand)`
    (contractions) says whether that split is on a dim the result keeps: where rule 5 leaves the
    choice open, a split the result keeps wins over one the contraction sums away (Megatron SP's
    weight gradient gathers the sequence-split output gradient, it does not move the features)."""
    placement_of = placement_of or (lambda n: ctx.placement(n, axis))
    ctx.gathers_by_rule(node, axis)
    keeps = [n for n in nodes if (not ctx.param_like(n)) == ctx.is_data_axis(axis)]
    candidates = keeps or list(nodes)
    if len({placement_of(n) for n in candidates}) > 1 and survives is not None:
        kept = [n for n in candidates if survives(n)]
        if kept and len({placement_of(n) for n in kept}) == 1:
            candidates = kept
    if len({placement_of(n) for n in candidates}) > 1:
        axis_name = ctx.axis_names[axis]
        kind = "data" if ctx.is_data_axis(axis) else "model"
        who = "data" if candidates and not ctx.param_like(candidates[0]) else "parameters"
        splits = ", ".join(f"{n.name} split along dim {split_dim(ctx.placement(n, axis))}" for n in candidates)
        first = candidates[0]
        spec = ctx.layout(first).to_spec(ctx.ndim(first), ctx.axis_names, ctx.axis_sizes)
        raise ctx.error(node, f"operands disagree on {kind} axis {axis_name!r} ({splits}), and all of them are "
                              f"{who}, so rule 5 (on a data axis the data keeps its split, on a model axis the "
                              f"parameter does) leaves the choice open; settle it with a constrain on one "
                              f"operand, e.g. constrain(<{first.name}>, {spec}) keeps {first.name}'s split, or "
                              f"constrain it to P() to replicate it")
    return candidates[0]


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
