"""Vocab-parallel cross-entropy by rule: logits split on the vocabulary over a model axis are never
gathered. The max logit is a `Partial("max")` (one all-reduce max), the sum of exponentials a
`Partial("sum")`, the target logit a masked local gather and its gradient a masked local scatter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from functional_parallel.launch import spawn
from sharding import Mesh, P, Partial, Replicate, Shard, jit, shard, unshard
from sharding import collectives
from sharding.layout import Layout

from .equivalence import assert_equals_reference

SPECS = ({"head": P(None, "tp"), "w": P()}, P("dp"))
VOCAB = 16


def test_placements_are_typed():
    layout = Layout((0, Replicate(), Partial("max")))
    assert layout.placements == (Shard(0), Replicate(), Partial("max"))
    assert repr(layout.placements) == "(Shard(0), Replicate(), Partial('max'))"
    assert Partial() == Partial("sum") != Partial("max")


def test_masked_local_gather_and_scatter():
    x = torch.arange(12.0).view(3, 4)                  # this rank holds columns 4..7
    ids = torch.tensor([[5], [1], [7]])
    assert collectives.vocab_parallel_gather(x, 1, ids, start=4).tolist() == [[1.0], [0.0], [11.0]]
    scattered = collectives.vocab_parallel_scatter(torch.zeros(3, 4), 1, ids, -1.0, start=4)
    assert scattered.tolist() == [[0, -1, 0, 0], [0, 0, 0, 0], [0, 0, 0, -1]]


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"head": torch.randn(8, VOCAB, generator=g, dtype=torch.float64),
              "w": torch.randn(8, 8, generator=g, dtype=torch.float64)}
    batch = {"x": torch.randn(4, 6, 8, generator=g, dtype=torch.float64),
             "labels": torch.randint(0, VOCAB, (4, 6), generator=g)}
    return params, batch


def _loss(params, batch):
    logits = torch.tanh(batch["x"] @ params["w"]) @ params["head"]       # [b, s, V], V split over tp
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))


def _lower(mesh):
    params, batch = _problem()
    step = jit(torch.func.grad_and_value(_loss), mesh=mesh, in_specs=SPECS, out_specs=(SPECS[0], P()))
    local = (shard(params, SPECS[0], mesh), shard(batch, SPECS[1], mesh))
    return step.lower(*local), local


def test_split_logits_are_not_gathered():
    lowered, _ = _lower(Mesh.abstract({"dp": 2, "tp": 2}))
    tp = [(c["kind"], c.get("op", "sum"), c["shape"]) for c in lowered.collectives if c["axes"] == ("tp",)]
    assert not [c for c in tp if c[0] == "all_gather"], tp
    assert ("all_reduce", "max", (24, 1)) in tp                           # the max logit, once
    assert tp.count(("all_reduce", "sum", (24, 1))) >= 1                  # the sum of exponentials
    # the loss, a Partial sum over dp (the batch) and tp (the target logits): one joint all-reduce
    loss = [c for c in lowered.collectives if c["value"] == "div"]
    assert [(c["kind"], c["axes"]) for c in loss] == [("all_reduce", ("dp", "tp"))]


def _run(rank, world):
    mesh = Mesh({"dp": 2, "tp": 2})
    lowered, local = _lower(mesh)
    grads, loss = lowered.run(*local)
    return loss, unshard(grads, SPECS[0], mesh)


@pytest.mark.slow  # four processes
def test_vocab_parallel_cross_entropy_equals_one_process():
    params, batch = _problem()
    ref_grads, ref_loss = torch.func.grad_and_value(_loss)(params, batch)
    assert_equals_reference(spawn(_run, 4), ref_loss, ref_grads, 1e-9, "vocab-parallel cross-entropy")
