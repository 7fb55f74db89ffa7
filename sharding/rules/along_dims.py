"""Ops that work along some dims and independently across the rest (pad, cumsum, topk, sort, flip,
roll): a shard on any other dim carries to every output; a shard on a worked dim is gathered first.
Linear ones (cumsum, zero padding) keep a Partial."""
from __future__ import annotations

import torch

from . import Choice, rule
from .choose import PARTIAL, REPLICATE, is_shard

aten = torch.ops.aten


def _along(ctx, node, axis, dims, linear: bool):
    x = node.args[0]
    placement = ctx.placement(x, axis)
    val = node.meta["val"]
    count = len(val) if isinstance(val, (list, tuple)) else None
    if placement == PARTIAL and linear:
        chosen, required = PARTIAL, {}
    elif is_shard(placement) and placement not in dims:
        chosen, required = placement, {}
    else:
        chosen, required = REPLICATE, {x: REPLICATE}
    return Choice(chosen if count is None else (chosen,) * count, required)


def _dims(ctx, node, dims):
    ndim = ctx.ndim(node.args[0])
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return {d % ndim for d in dims}


def _arg(node, index, name, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


@rule(aten.constant_pad_nd.default)
def constant_pad(ctx, node, axis):
    pad, ndim = node.args[1], ctx.ndim(node.args[0])
    padded = {ndim - 1 - i // 2 for i, amount in enumerate(pad) if amount}
    return _along(ctx, node, axis, padded, linear=_arg(node, 2, "value", 0) == 0)


@rule(aten.cumsum.default, aten.cumprod.default, aten.cummax.default, aten.cummin.default,
      aten.logcumsumexp.default)
def cumulative(ctx, node, axis):
    return _along(ctx, node, axis, _dims(ctx, node, node.args[1]), linear=node.target is aten.cumsum.default)


@rule(aten.topk.default)
def topk(ctx, node, axis):
    return _along(ctx, node, axis, _dims(ctx, node, _arg(node, 2, "dim", -1)), linear=False)


@rule(aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable)
def sort(ctx, node, axis):
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else -1)
    return _along(ctx, node, axis, _dims(ctx, node, dim), linear=False)


@rule(aten.flip.default)
def flip(ctx, node, axis):
    return _along(ctx, node, axis, _dims(ctx, node, node.args[1]), linear=True)


@rule(aten.roll.default)
def roll(ctx, node, axis):
    dims = _arg(node, 2, "dims", [])
    touched = _dims(ctx, node, dims) if dims else set(range(ctx.ndim(node.args[0])))
    return _along(ctx, node, axis, touched, linear=True)
