"""Reductions: summing a split dim gives a Partial sum, a max (min) over it a Partial max (min);
an arg-max or a product over a split dim needs the whole dim."""
from __future__ import annotations

import torch

from ..layout import PARTIAL_MAX, PARTIAL_MIN, Strided, split_dim
from . import Choice, handles_strided, rule
from .choose import PARTIAL, REPLICATE, is_shard

aten = torch.ops.aten


def _reduced_dims(ctx, node) -> tuple[list[int], bool]:
    ndim = ctx.ndim(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim)), False
    if isinstance(dims, int):
        dims = [dims]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return sorted(d % ndim for d in dims), bool(keepdim)


def _kept_position(dim: int, reduced: list[int], keepdim: bool) -> int:
    return dim if keepdim else dim - sum(1 for r in reduced if r < dim)


@handles_strided
@rule(aten.sum.dim_IntList, aten.sum.default)
def sum_(ctx, node, axis):
    placement = ctx.placement(node.args[0], axis)
    if node.target is aten.sum.default:
        reduced, keepdim = list(range(ctx.ndim(node.args[0]))), False
    else:
        reduced, keepdim = _reduced_dims(ctx, node)
    if placement == PARTIAL or (split_dim(placement) is not None and split_dim(placement) in reduced):
        return Choice(PARTIAL)
    if isinstance(placement, Strided):
        return Choice(Strided(_kept_position(placement.dim, reduced, keepdim), placement.chunks))
    if is_shard(placement):
        return Choice(_kept_position(placement, reduced, keepdim))
    return Choice(REPLICATE)


_CANDIDATES = {aten.amax.default: PARTIAL_MAX, aten.amin.default: PARTIAL_MIN}


@rule(aten.amax, aten.amin, aten.any.dim, aten.any.dims, aten.any.default, aten.all.default, aten.all.dim,
      aten.argmax, aten.argmin, aten.prod.dim_int, aten.prod.default)
def order_reduction(ctx, node, axis):
    x = node.args[0]
    placement = ctx.placement(x, axis)
    if node.target in (aten.any.default, aten.all.default, aten.prod.default) or (
            node.target in (aten.argmax.default, aten.argmin.default) and len(node.args) < 2):
        reduced, keepdim = list(range(ctx.ndim(x))), False
    else:
        reduced, keepdim = _reduced_dims(ctx, node)
    if is_shard(placement) and placement in reduced and node.target in _CANDIDATES:
        # Each rank's max over its block is a candidate; the max over ranks is the max.
        return Choice(_CANDIDATES[node.target])
    if placement == PARTIAL or (is_shard(placement) and placement in reduced):
        return Choice(REPLICATE, {x: REPLICATE})
    if is_shard(placement):
        return Choice(_kept_position(placement, reduced, keepdim))
    return Choice(REPLICATE)
