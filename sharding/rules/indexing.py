"""Indexing: embedding lookups (`weight[ids]`) and their backward (`index_put` with accumulate),
`gather`/`scatter`. Whole indices into a tensor split along the indexed dim are looked up where
the values lie (masked, zeros elsewhere: Megatron's vocab-parallel embedding and cross-entropy):
a lookup or gather is then a Partial sum, a scatter stays split."""
from __future__ import annotations

import torch

from . import Choice, rule
from .choose import PARTIAL, REPLICATE, anchor, is_shard

aten = torch.ops.aten


def _single_index(ctx, node, indices):
    if len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
        raise ctx.error(node, "only indexing the first dim with one index tensor (an embedding lookup) "
                              "has a sharding rule")
    return indices[0]


@rule(aten.index.Tensor)
def index(ctx, node, axis):
    table, ids = node.args[0], _single_index(ctx, node, node.args[1])
    pt, pi = ctx.placement(table, axis), ctx.placement(ids, axis)
    ids_ndim = ctx.ndim(ids)
    if pt == PARTIAL and pi == REPLICATE:
        return Choice(PARTIAL)
    if pt == PARTIAL or pi == PARTIAL:
        pt, pi = (REPLICATE if pt == PARTIAL else pt), (REPLICATE if pi == PARTIAL else pi)
    if is_shard(pt) and pt == 0 and pi == REPLICATE and ctx.ndim(table) >= 1:
        # Vocab-parallel lookup (Megatron's VocabParallelEmbedding): each rank looks up the ids
        # that fall in its rows and gives zeros for the rest; the sum over ranks is the lookup.
        return Choice(PARTIAL, {table: 0, ids: REPLICATE}, local="vocab_parallel")
    if is_shard(pt) and pt == 0:
        pt = REPLICATE                                    # ids split on this axis too: whole table
    if is_shard(pt) and is_shard(pi):                     # both split: the anchor keeps its split
        if anchor(ctx, axis, node, [table, ids], lambda n: "table" if n is table else "ids") is table:
            pi = REPLICATE
        else:
            pt = REPLICATE
    out = pi if is_shard(pi) else (ids_ndim + pt - 1 if is_shard(pt) else REPLICATE)
    return Choice(out, {table: pt, ids: pi})


@rule(aten.index_put.default, aten._index_put_impl_.default, aten.index_put_.default)
def index_put(ctx, node, axis):
    base, ids, values = node.args[0], _single_index(ctx, node, node.args[1]), node.args[2]
    ids_ndim = ctx.ndim(ids)
    pv, pi = ctx.placement(values, axis), ctx.placement(ids, axis)
    if is_shard(pv) and pv < ids_ndim and pi in (pv, REPLICATE):
        # Each rank scatters its own rows (slicing replicated ids is free): the sums add up.
        return Choice(PARTIAL, {base: PARTIAL, ids: pv})
    if is_shard(pv) and pv >= ids_ndim:
        return Choice(pv - ids_ndim + 1, {base: pv - ids_ndim + 1, ids: REPLICATE})
    if pv == PARTIAL:
        return Choice(PARTIAL, {base: PARTIAL, ids: REPLICATE})
    return Choice(REPLICATE, {base: REPLICATE, ids: REPLICATE, values: REPLICATE})


@rule(aten.gather.default)
def gather(ctx, node, axis):
    x, dim, ids = node.args[0], node.args[1] % ctx.ndim(node.args[0]), node.args[2]
    px, pi = ctx.placement(x, axis), ctx.placement(ids, axis)
    if px == PARTIAL and pi == REPLICATE:
        return Choice(PARTIAL)
    if is_shard(px) and px == dim and pi == REPLICATE:
        # The target logit of a vocab-parallel cross-entropy: each rank picks the ids in its block.
        return Choice(PARTIAL, {x: dim, ids: REPLICATE}, local="vocab_parallel")
    split = px if is_shard(px) and px != dim else (pi if is_shard(pi) and pi != dim else REPLICATE)
    return Choice(split, {x: split, ids: split})


@rule(aten.scatter.value, aten.scatter.src)
def scatter(ctx, node, axis):
    x, dim, ids = node.args[0], node.args[1] % ctx.ndim(node.args[0]), node.args[2]
    px, pi = ctx.placement(x, axis), ctx.placement(ids, axis)
    src = node.args[3] if node.target is aten.scatter.src else None
    if is_shard(px) and px == dim and pi == REPLICATE and (src is None or ctx.placement(src, axis) == REPLICATE):
        # Each rank writes the ids that fall in its block (the cross-entropy gradient's one-hot).
        required = {x: dim, ids: REPLICATE, **({src: REPLICATE} if src is not None else {})}
        return Choice(dim, required, local="vocab_parallel")
    split = pi if is_shard(pi) and pi != dim else (px if is_shard(px) and px != dim else REPLICATE)
    required = {x: split, ids: split}
    if node.target is aten.scatter.src:
        required[node.args[3]] = split
    return Choice(split, required)
