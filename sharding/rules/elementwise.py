"""Pointwise ops (with broadcasting): shards win over replicas, Partials stay Partial where the op is linear."""
from __future__ import annotations

import torch

from ..checkpoint_name import CHECKPOINT_NAME
from ..layout import Strided, split_dim
from ..ops import ELEMENTWISE, overloads
from . import Choice, handles_strided, rule, tensor_inputs
from .choose import PARTIAL, REPLICATE, anchor, broadcast_dim, is_shard, to_output_dim

aten = torch.ops.aten

# Linearity is the one fact torch's tags do not give: these keep a Partial operand Partial.
SUMS = [aten.add.Tensor, aten.sub.Tensor]                       # linear when every operand is Partial
PRODUCTS = [aten.mul.Tensor, aten.div.Tensor]                   # linear in one Partial operand
UNARY_LINEAR = [aten.neg, aten.clone, aten._to_copy, aten.alias, aten.detach, aten.lift_fresh_copy,
                aten.mul.Scalar, aten.div.Scalar,
                CHECKPOINT_NAME]  # an identity (`sharding.remat` removes it before propagation anyway)
SELECT = [aten.where.self]
_TARGETS = ELEMENTWISE  # the linear ops above are elementwise too
_SUMS, _PRODUCTS, _SELECT = set(SUMS), set(PRODUCTS), set(SELECT)
_UNARY_LINEAR = overloads(UNARY_LINEAR)


def _linear_choice(ctx, node, axis, inputs):
    """The Partial-preserving choice, or None if the op is not linear in its Partial operands."""
    placements = {i: ctx.placement(i, axis) for i in inputs}
    target = node.target
    if target in _UNARY_LINEAR and not _widens(node):
        return Choice(PARTIAL)
    if target in _SUMS or target in _SELECT:
        values = inputs if target in _SUMS else [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
        scalar_operand = any(not isinstance(a, torch.fx.Node) for a in (node.args[:2] if target in _SUMS
                                                                         else node.args[1:3]))
        if scalar_operand and not all(ctx.is_zeros(v) for v in values):
            return None
        if target in _SELECT and placements[node.args[0]] == PARTIAL:
            return None
        # Replicated scalars (0-dim: a running norm) and zeros join as Partial by masking (one rank
        # keeps them); a replicated tensor instead makes the Partial reduce here, where the user
        # wrote the sum (Megatron's all-reduce before the residual add).
        if all(placements[v] == PARTIAL or ctx.is_zeros(v) or ctx.ndim(v) == 0 for v in values):
            return Choice(PARTIAL, {v: PARTIAL for v in values})
        return None
    if target in _PRODUCTS:
        partial_operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node) and placements[a] == PARTIAL]
        if len(partial_operands) == 1 and (target is aten.mul.Tensor or partial_operands[0] is node.args[0]):
            return Choice(PARTIAL)
    return None


def _widens(node) -> bool:
    """A cast to a wider dtype (a bf16 gradient cast to fp32 for the norm). A Partial is reduced
    before it, where it is smaller: once, shared by every consumer of the uncast value, instead of
    once per cast copy and once more for the uncast uses (mixed precision reduces bf16 gradients).
    A narrowing cast (an int64 count to fp32) keeps the Partial and reduces the smaller result."""
    dtype = node.kwargs.get("dtype")
    source = node.args[0] if node.args else None
    if node.target is not aten._to_copy.default or dtype is None or not isinstance(source, torch.fx.Node):
        return False
    val = source.meta.get("val")
    return isinstance(val, torch.Tensor) and dtype.itemsize > val.dtype.itemsize


def _output_split(ctx, node, inp, axis):
    """(output dim, chunks) that `inp`'s split on `axis` stands for, or None if it is not split."""
    placement = ctx.placement(inp, axis)
    dim = split_dim(placement)
    if dim is None:
        return None
    return to_output_dim(ctx, node, inp, dim), placement.chunks if isinstance(placement, Strided) else 1


@handles_strided
@rule(*sorted(_TARGETS, key=str))
def elementwise(ctx, node, axis):
    inputs = tensor_inputs(node)
    out_shape = ctx.shape(node)
    shards: dict[tuple, list] = {}
    for inp in inputs:
        split = _output_split(ctx, node, inp, axis)
        if split is not None:
            shards.setdefault(split, []).append(inp)
    if len(shards) > 1:
        winner = anchor(ctx, axis, node, [i for group in shards.values() for i in group],
                        lambda i: _output_split(ctx, node, i, axis))
        split = _output_split(ctx, node, winner, axis)
    elif shards:
        split = next(iter(shards))
    else:
        split = None
        if any(ctx.placement(i, axis) == PARTIAL for i in inputs):
            choice = _linear_choice(ctx, node, axis, inputs)
            if choice is not None:
                return choice
            hint = ctx.hint(node, axis)
            if is_shard(hint) and ctx.divisible(out_shape, hint, axis):
                split = (hint, 1)
            elif isinstance(hint, Strided) and hint.dim < len(out_shape) and out_shape[hint.dim] % hint.chunks == 0 \
                    and ctx.divisible([out_shape[hint.dim] // hint.chunks], 0, axis):
                split = (hint.dim, hint.chunks)  # each piece split (a hint through an unflattening view)
    if split is None:
        return Choice(REPLICATE, {i: REPLICATE for i in inputs})
    dim, chunks = split
    placement_at = (lambda d: Strided(d, chunks)) if chunks > 1 else (lambda d: d)
    required = {}
    for inp in inputs:
        in_dim = broadcast_dim(ctx, node, inp, dim)
        required[inp] = REPLICATE if in_dim is None else placement_at(in_dim)
    return Choice(placement_at(dim), required)
