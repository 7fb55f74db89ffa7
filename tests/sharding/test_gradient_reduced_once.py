"""A gradient read by several optimizer ops is reduced once (not once per linear branch).

Plain AdamW reads each gradient three times ((1-b1)·g, (1-b2)·g·g); before the fix each branch
carried its own Partial and was reduced separately: 3× the bytes and collectives. Lowered on
abstract meshes (no processes); the slow test checks the numbers still equal the reference.
"""
from __future__ import annotations

import pytest
import torch

from functional_parallel import optim
from functional_parallel.launch import spawn
from functional_parallel.models import build
from functional_parallel.parallel import example_mesh, Strategy, compile_step, lower_abstract
from functional_parallel.tree import tree_leaves
from functional_parallel.train import make_train_step
from sharding import Mesh, shard, unshard


# What the insert pass places, one collective per value: the schedule passes (buckets, ZeRO-3's
# backward re-gathers) are tested apart in test_schedule_*.py and test_formulas.py.
UNSCHEDULED = {"bucket_bytes": 0, "regather": False}


def _bytes(lowered, kind, axis):
    return sum(r["bytes"] for r in lowered.collectives if r["kind"] == kind and r["axes"] == (axis,))


def _param_bytes():
    return 4 * sum(p.numel() for p in tree_leaves(build("gpt", "tiny").init(0)))


@pytest.mark.parametrize("optimizer", [optim.adamw(1e-3), optim.sgd(0.1, momentum=0.9)], ids=["adamw", "sgd"])
def test_dp_all_reduces_each_gradient_once(optimizer):
    _, _, lowered = lower_abstract("gpt", "tiny", "dp", example_mesh("dp"), 8, optimizer=optimizer, **UNSCHEDULED)
    # the parameters' gradients, plus the loss and the grad-norm metric (4 B each)
    assert _bytes(lowered, "all_reduce", "dp") == _param_bytes() + 8
    assert len(lowered.collectives) == len(tree_leaves(build("gpt", "tiny").init(0))) + 2


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_reduce_scatters_each_gradient_once(strategy):
    _, _, lowered = lower_abstract("gpt", "tiny", strategy, example_mesh(strategy), 8, optimizer=optim.adamw(1e-3),
                                 **UNSCHEDULED)
    assert _bytes(lowered, "reduce_scatter", "dp") == _param_bytes()
    assert _bytes(lowered, "all_gather", "dp") == _param_bytes()


def test_tp_reduces_gradients_over_dp_once():
    with_clipping = lower_abstract("gpt", "tiny", "tp", example_mesh("tp"), 8)[2]
    plain = lower_abstract("gpt", "tiny", "tp", example_mesh("tp"), 8, optimizer=optim.adamw(1e-3))[2]
    # clipping reads the whole gradient first, so it is reduced once either way: the same dp traffic
    assert _bytes(plain, "all_reduce", "dp") == _bytes(with_clipping, "all_reduce", "dp")


def _run(rank, world, names):
    model = build("gpt", "tiny")
    params = model.init(0, dtype=torch.float64)
    optimizer = optim.adamw(1e-2)
    tokens = torch.randint(0, model.cfg.vocab_size, (8, model.cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    out = {}
    for name in names:
        strategy, _, variant = name.partition(":")
        mesh = Mesh(example_mesh(strategy))
        state = optimizer.init(params)
        options = {"bucket_per_layer": True} if variant == "per_layer" else {}
        step, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer), Strategy.load(strategy),
                                                     mesh, params, state, axes=model.axes(params), **options)
        p, s = shard(params, pspecs, mesh), shard(state, sspecs, mesh)
        for _ in range(2):
            p, s, _ = step(p, s, shard(batch, bspec, mesh))
        out[name] = unshard(p, pspecs, mesh)
    return out


@pytest.mark.slow
def test_plain_adamw_strategies_equal_reference():
    model = build("gpt", "tiny")
    params = model.init(0, dtype=torch.float64)
    optimizer = optim.adamw(1e-2)
    step = make_train_step(model.loss, optimizer)
    tokens = torch.randint(0, model.cfg.vocab_size, (8, model.cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    state = optimizer.init(params)
    reference = params
    for _ in range(2):
        reference, state, _ = step(reference, state, batch)
    names = ["dp", "zero1", "zero3", "zero3:per_layer", "tp_sp", "fsdp_tp"]  # per_layer: FSDP2's buckets
    for rank_result in spawn(_run, 4, names, timeout_s=300):
        for name in names:
            for got, want in zip(tree_leaves(rank_result[name]), tree_leaves(reference)):
                assert (got - want).abs().max().item() < 1e-9, name
