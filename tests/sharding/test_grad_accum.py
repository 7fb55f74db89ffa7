"""Gradient accumulation: N micro-batches in one compiled step, gradients reduced once per step.

The lowering tests run on abstract meshes (no processes): accumulating over 2 micro-batches must
leave every gradient reduction (bucket) exactly as in the 1-micro-batch step (the Partials add up
locally); only per-micro-batch work repeats: tp_sp's activation collectives, ZeRO-3's parameter
gathers, the 4-byte loss.
The slow test checks dp, zero3 and tp_sp against the single large-batch reference in float64.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from functional_parallel import optim
from functional_parallel.launch import spawn
from functional_parallel.models import build
from functional_parallel.parallel import example_mesh, Strategy, compile_step, lower_abstract
from functional_parallel.train import make_train_step
from functional_parallel.tree import tree_leaves
from sharding import Mesh, shard, unshard

GLOBAL_BATCH = 16
ACTIVATION_DIMS = 3  # [batch, seq, embed]


def _collectives(strategy: str, grad_accum: int):
    lowered = lower_abstract("gpt", "tiny", strategy, example_mesh(strategy), GLOBAL_BATCH, grad_accum=grad_accum)
    return lowered[2].collectives


def _gradient_reductions(collectives, axis):
    """Every non-scalar, non-activation reduction over `axis` (the gradients' all-reduces and
    reduce-scatters, bucketed or not) as (kind, shape, dtype, bytes)."""
    return Counter((c["kind"], c["shape"], c["dtype"], c["bytes"]) for c in collectives
                   if c["axes"] == (axis,) and c["kind"] != "all_gather" and c["shape"] != ()
                   and (c["shape"] is None or len(c["shape"]) < ACTIVATION_DIMS))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["dp", "zero3", "tp_sp"])
def test_accumulation_reduces_each_gradient_once_per_step(strategy):
    once, accumulated = _collectives(strategy, 1), _collectives(strategy, 2)
    for axis in example_mesh(strategy):
        assert _gradient_reductions(accumulated, axis) == _gradient_reductions(once, axis), axis
    assert sum(key[3] for key in _gradient_reductions(accumulated, "dp")) > 0
    scalars = [c for c in accumulated if c["shape"] == ()]
    assert len(scalars) <= len([c for c in once if c["shape"] == ()]) + 2  # one 4-byte loss value per extra micro-batch
    if strategy == "tp_sp":  # the sequence-parallel activations move once per micro-batch
        activations = lambda cs: sum(1 for c in cs if c["axes"] == ("tp",) and len(c["shape"]) >= ACTIVATION_DIMS)
        assert activations(accumulated) == 2 * activations(once)


def test_local_batch_that_does_not_split_is_a_clear_error():
    # 8 rows over dp=4 is 2 rows per rank: not 4 micro-batches, though 8 % 4 == 0 globally
    with pytest.raises(ValueError, match="2 rows per rank.*4 equal micro-batches"):
        lower_abstract("gpt", "tiny", "dp", example_mesh("dp"), 8, grad_accum=4)
    with pytest.raises(ValueError, match="grad_accum must be"):
        make_train_step(build("gpt", "tiny").loss, optim.sgd(0.1), grad_accum=0)


def _problem():
    model = build("gpt", "tiny")
    params = model.init(0, dtype=torch.float64)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    tokens = torch.randint(0, model.cfg.vocab_size, (GLOBAL_BATCH, model.cfg.seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    return model, params, optimizer, batch


def _reference(steps: int):
    model, params, optimizer, batch = _problem()
    step, state, losses = make_train_step(model.loss, optimizer), optimizer.init(params), []
    for _ in range(steps):
        params, state, metrics = step(params, state, batch)
        losses.append(metrics["loss"])
    return params, losses


def test_single_process_accumulation_equals_large_batch():
    model, params, optimizer, batch = _problem()
    want, want_losses = _reference(1)
    got, _, metrics = make_train_step(model.loss, optimizer, grad_accum=4)(params, optimizer.init(params), batch)
    assert (metrics["loss"] - want_losses[0]).abs().item() < 1e-12
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        assert (g - w).abs().max().item() < 1e-12


def _run(rank, world, names, steps):
    model, params, optimizer, batch = _problem()
    out = {}
    for name in names:
        mesh, state = Mesh(example_mesh(name)), optimizer.init(params)
        step, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer, grad_accum=2),
                                                     Strategy.load(name), mesh, params, state,
                                                     axes=model.axes(params))
        p, s, losses = shard(params, pspecs, mesh), shard(state, sspecs, mesh), []
        for _ in range(steps):
            p, s, metrics = step(p, s, shard(batch, bspec, mesh))
            losses.append(metrics["loss"])
        out[name] = (unshard(p, pspecs, mesh), losses)
    return out


@pytest.mark.slow
def test_accumulated_strategies_equal_large_batch_reference():
    names, steps = ["dp", "zero3", "tp_sp"], 2
    want, want_losses = _reference(steps)
    for rank_result in spawn(_run, 4, names, steps, timeout_s=300):
        for name in names:
            got, losses = rank_result[name]
            assert max(abs(a - b).item() for a, b in zip(losses, want_losses)) < 1e-9, name
            for g, w in zip(tree_leaves(got), tree_leaves(want)):
                assert (g - w).abs().max().item() < 1e-9, name
