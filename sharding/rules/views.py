"""Views and shape ops: shards follow their dim through reshapes, transposes, slices and concatenations.

A reshape keeps a shard when the sharded dim leads its group of merged/split dims (then each
rank's block is still contiguous); merged behind leading dims into one dim ([b, s, d] -> [b*s, d]
with s split) it becomes a chunked split of that dim (each leading piece holds its block); any other
group gathers the dim first. Partials pass through every view (they are linear).
"""
from __future__ import annotations

import torch

from ..layout import Strided, split_dim
from . import Choice, handles_strided, rule, tensor_inputs
from .choose import PARTIAL, REPLICATE, is_shard

aten = torch.ops.aten


def view_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of input and output dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        in_dims, out_dims, pi, pj = [], [], 1, 1
        if i < len(in_shape):
            in_dims.append(i)
            pi, i = pi * in_shape[i], i + 1
        if j < len(out_shape):
            out_dims.append(j)
            pj, j = pj * out_shape[j], j + 1
        while pi != pj:
            if pi < pj:
                in_dims.append(i)
                pi, i = pi * in_shape[i], i + 1
            else:
                out_dims.append(j)
                pj, j = pj * out_shape[j], j + 1
        groups.append((in_dims, out_dims))
    return groups


def _first_significant(dims, shape):
    return next((d for d in dims if shape[d] > 1), None)


def _local_sizes(ctx, shape, axis, placements_of) -> list[int]:
    """Sizes of `shape`'s dims within the block the mesh axes before `axis` leave."""
    sizes = list(shape)
    for earlier in range(axis):
        dim = split_dim(placements_of(earlier))
        if dim is not None:
            sizes[dim] //= ctx.axis_sizes[earlier]
    return sizes


@handles_strided
@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view.dtype)
def reshape(ctx, node, axis):
    """A split follows its dim through a reshape when the dim leads its group of merged or split
    dims, or becomes chunked where it is merged behind others into one dim (else the dim is gathered
    first); a chunked dim keeps its chunks through a reshape that leaves it whole, and a chunked dim
    split into its pieces is a plain split of the piece dim."""
    x = node.args[0]
    placement = ctx.placement(x, axis)
    dim = split_dim(placement)
    if dim is None:
        return Choice(placement)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node)
    count = ctx.axis_sizes[axis]
    in_local = _local_sizes(ctx, in_shape, axis, lambda a: ctx.placement(x, a))
    out_local = _local_sizes(ctx, out_shape, axis, lambda a: _output_placement(ctx, node, a))
    for in_dims, out_dims in view_groups(in_shape, out_shape):
        if dim not in in_dims:
            continue
        if not isinstance(placement, Strided):
            # A plain split survives only where it leads its group; merged behind others it is
            # gathered (a chunked result there would meet plain splits the rules cannot reconcile).
            target = _first_significant(out_dims, out_shape)
            total = ctx.layout(x).shard_count(dim, ctx.axis_sizes)
            if _first_significant(in_dims, in_shape) == dim and target is not None and out_shape[target] % total == 0:
                return Choice(target)
            merged = [d for d in out_dims if out_shape[d] > 1]
            if len(merged) == 1 and merged[0] == target:
                # Merged behind others into one dim ([B, S, D] -> [B*S, D] with S split): each of
                # the `before` leading pieces holds its block of the split dim, a chunked split.
                before = 1
                for d in in_dims[:in_dims.index(dim)]:
                    before *= in_local[d]
                if out_local[target] % (before * count) == 0:
                    return Choice(Strided(target, before) if before > 1 else target)
            break
        before = 1  # pieces in front of the chunked dim within the group, in this axis's block
        for d in in_dims[:in_dims.index(dim)]:
            before *= in_local[d]
        pieces = before * placement.chunks
        # The output dim where the split part starts: `pieces` whole pieces of the group lie before it.
        running = 1
        for out_dim in out_dims:
            if running == pieces and out_local[out_dim] % count == 0 and out_local[out_dim] > 1:
                return Choice(out_dim)
            if running * out_local[out_dim] > pieces:
                if pieces % running == 0 and (out_local[out_dim] % (pieces // running)) == 0 and \
                        (out_local[out_dim] // (pieces // running)) % count == 0:
                    return Choice(Strided(out_dim, pieces // running) if pieces // running > 1 else out_dim)
                break
            running *= out_local[out_dim]
        break
    ctx.gathers_by_rule(node, axis)  # a group no chunked split describes (rule 9 names it)
    return Choice(REPLICATE, {x: REPLICATE})


def _output_placement(ctx, node, axis):
    return reshape(ctx, node, axis).output


def _mapped(ctx, node, axis, dim_map):
    """Output placement when input dim d becomes output dim dim_map[d] (None: the dim disappears)."""
    placement = ctx.placement(node.args[0], axis)
    dim = split_dim(placement)
    if dim is None:
        return Choice(placement)
    target = dim_map(dim)
    if target is None:
        return Choice(REPLICATE, {node.args[0]: REPLICATE})
    return Choice(Strided(target, placement.chunks) if isinstance(placement, Strided) else target)


@handles_strided
@rule(aten.t.default)
def t(ctx, node, axis):
    return _mapped(ctx, node, axis, lambda d: 1 - d if ctx.ndim(node.args[0]) == 2 else d)


@handles_strided
@rule(aten.transpose.int)
def transpose(ctx, node, axis):
    ndim = ctx.ndim(node.args[0])
    d0, d1 = node.args[1] % ndim, node.args[2] % ndim
    return _mapped(ctx, node, axis, lambda d: d1 if d == d0 else d0 if d == d1 else d)


@handles_strided
@rule(aten.permute.default)
def permute(ctx, node, axis):
    ndim = ctx.ndim(node.args[0])
    order = [d % ndim for d in node.args[1]]
    return _mapped(ctx, node, axis, lambda d: order.index(d))


@handles_strided
@rule(aten.unsqueeze.default)
def unsqueeze(ctx, node, axis):
    new = node.args[1] % ctx.ndim(node)
    return _mapped(ctx, node, axis, lambda d: d + 1 if d >= new else d)


@handles_strided
@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(ctx, node, axis):
    in_shape = ctx.shape(node.args[0])
    if node.target is aten.squeeze.default:
        removed = [d for d, s in enumerate(in_shape) if s == 1]
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        removed = [d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1]
    return _mapped(ctx, node, axis, lambda d: None if d in removed else d - sum(r < d for r in removed))


@handles_strided
@rule(aten.expand.default)
def expand(ctx, node, axis):
    offset = ctx.ndim(node) - ctx.ndim(node.args[0])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    return _mapped(ctx, node, axis, lambda d: d + offset if in_shape[d] == out_shape[d + offset] else None)


def _is_full_slice(shape, dim, start, end, step) -> bool:
    return (start in (None, 0)) and (end is None or end >= shape[dim]) and step in (None, 1)


@handles_strided
@rule(aten.slice.Tensor)
def slice_(ctx, node, axis):
    x = node.args[0]
    args = list(node.args) + [None] * (5 - len(node.args))
    dim = (args[1] or 0) % ctx.ndim(x)
    full = _is_full_slice(ctx.shape(x), dim, args[2], args[3], args[4])
    return _mapped(ctx, node, axis, lambda d: d if (d != dim or full) else None)


@rule(aten.slice_backward.default, aten.select_backward.default)
def slice_backward(ctx, node, axis):
    dim = node.args[2] % ctx.ndim(node)
    if node.target is aten.select_backward.default:
        return _mapped(ctx, node, axis, lambda d: d + 1 if d >= dim else d)
    return _mapped(ctx, node, axis, lambda d: None if d == dim else d)


@handles_strided
@rule(aten.select.int)
def select(ctx, node, axis):
    dim = node.args[1] % ctx.ndim(node.args[0])
    return _mapped(ctx, node, axis, lambda d: None if d == dim else (d - 1 if d > dim else d))


@handles_strided
@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)
def split(ctx, node, axis):
    """Pieces of a split dim are whole (gathered first), except that a dim chunked into as many
    equal pieces as the op makes splits each piece plainly (a fused qkv into q, k and v)."""
    x = node.args[0]
    ndim = ctx.ndim(x)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if node.target is aten.unbind.int:
        dim = node.args[1] if len(node.args) > 1 else 0
    dim %= ndim
    pieces = node.meta["val"]
    count = len(pieces)
    placement = ctx.placement(x, axis)
    if isinstance(placement, Strided) and placement.dim == dim and placement.chunks == count and \
            node.target is not aten.unbind.int and len({tuple(p.shape) for p in pieces}) == 1:
        return Choice((dim,) * count)
    if split_dim(placement) == dim or isinstance(placement, Strided):
        return Choice((REPLICATE,) * count, {x: REPLICATE})
    if node.target is aten.unbind.int and is_shard(placement) and placement > dim:
        placement -= 1
    return Choice((placement,) * count)


def _concatenate(ctx, node, axis, dim, shift):
    inputs = tensor_inputs(node)
    placements = {ctx.placement(i, axis) for i in inputs}
    if placements == {dim} and not shift and len(inputs) == len(node.args[0]) and \
            len({ctx.shape(i) for i in inputs}) == 1:
        # Equal pieces each split along the joined dim: the result is chunked (q, k, v grads -> qkv).
        return Choice(Strided(dim, len(inputs)))
    if any(isinstance(p, Strided) for p in placements):
        (placement,) = placements if len(placements) == 1 else (None,)
        if isinstance(placement, Strided) and (placement.dim != dim or shift):
            # Pieces chunked alike along another dim join into the same chunks (RoPE's halves).
            return Choice(Strided(placement.dim + (1 if shift and placement.dim >= dim else 0), placement.chunks))
        return Choice(REPLICATE, {i: REPLICATE for i in inputs})
    if len(placements) == 1:
        (placement,) = placements
        if not is_shard(placement):
            return Choice(placement)
        if shift or placement != dim:
            return Choice(placement + (1 if shift and placement >= dim else 0))
    elif placements <= {PARTIAL, REPLICATE} and all(
            ctx.placement(i, axis) == PARTIAL or ctx.is_zeros(i) or ctx.ndim(i) == 0 for i in inputs):
        # Concatenation is linear: replicated pieces join as Partial by masking (no communication).
        return Choice(PARTIAL, {i: PARTIAL for i in inputs})
    return Choice(REPLICATE, {i: REPLICATE for i in inputs})


@handles_strided
@rule(aten.cat.default)
def cat(ctx, node, axis):
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ctx.ndim(node)
    return _concatenate(ctx, node, axis, dim, shift=False)


@rule(aten.stack.default)
def stack(ctx, node, axis):
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ctx.ndim(node)
    return _concatenate(ctx, node, axis, dim, shift=True)
