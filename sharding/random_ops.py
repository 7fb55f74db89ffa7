"""Random ops on split values: every rank that holds the same block draws the same numbers, ranks
holding different blocks draw independent ones (Megatron's model-parallel RNG, by rule).

A random op (dropout's `bernoulli_`, `rand_like`, ...) follows its input's shards (`rules.creation`).
Drawn as written, every rank would draw its local block from its own copy of torch's global
generator, which is in the same state on every rank: replicated values agree (as they must), but
the blocks of a split value would all get the same numbers (one dropout mask repeated over the tp
ranks' heads or the dp ranks' samples). So where the value is split, insert replaces the op by
`rank_seeded(op, <this rank's block index>, ...)`: it draws one seed from the global generator (the
same draw on every rank, so the streams stay in step), mixes in the block index, and runs the op
on a generator forked from that seed. What the step draws depends on the mesh, so a run with
dropout equals its single-process reference only in distribution; equivalence tests keep it off.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

aten = torch.ops.aten

RANDOM_OPS = frozenset({aten.bernoulli_.float, aten.bernoulli.default, aten.bernoulli.p, aten.rand_like.default,
                        aten.randn_like.default, aten.uniform_.default, aten.normal_.default})
_MIX = 0x9E3779B97F4A7C15  # spreads block indices over the seed space (the golden-ratio constant)


def rank_seeded(op, block: int, *args, **kwargs):
    """`op(*args, **kwargs)` drawn from a generator seeded by the global stream's next draw and `block`."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(isinstance(t, FakeTensor) for t in tensors):  # sizing runs: nothing is drawn
        return op(*args, **kwargs)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.long))
    device = tensors[0].device if tensors else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed ^ (block * _MIX)) % 2 ** 63)
        return op(*args, **kwargs)
