"""Creation ops: new tensors are replicated; `*_like` ops follow their input's shards."""
from __future__ import annotations

import torch

from . import Choice, rule
from .choose import REPLICATE, is_shard

aten = torch.ops.aten


@rule(aten.zeros, aten.ones, aten.full, aten.empty.memory_format, aten.empty_strided, aten.scalar_tensor,
      aten.arange, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.new_empty_strided)
def fresh(ctx, node, axis):
    # The shape argument is global; a replicated result keeps it as is when localized.
    return Choice(REPLICATE, {})


@rule(aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
      aten.bernoulli_, aten.bernoulli, aten.uniform_, aten.normal_)
def like(ctx, node, axis):
    # The values are new, so only the input's shards carry over (ones_like of a Partial is Replicate).
    # Random draws too (dropout's mask): where they are split, each block draws its own numbers
    # (`sharding.random_ops`, inserted by `insert`).
    placement = ctx.placement(node.args[0], axis)
    return Choice(placement if is_shard(placement) else REPLICATE, {})

