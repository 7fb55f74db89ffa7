"""Indexing rules: a table split on its rows (vocabulary) over a model axis is looked up where
it lies (Megatron's VocabParallelEmbedding): masked local lookup, output Partial, no gather."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from functional_parallel.launch import spawn
from sharding import Mesh, P, jit, shard, unshard
from sharding import collectives

from .equivalence import assert_equals_reference

SPECS = ({"table": P("tp", None), "w": P()}, P("dp"))


def test_vocab_parallel_index_gives_its_rows_and_zeros_elsewhere():
    table = torch.arange(8.0).view(4, 2)
    ids = torch.tensor([[0, 3], [5, 6]])
    local = collectives.vocab_parallel_index(table, ids, start=4)   # this rank holds rows 4..7
    assert local.tolist() == [[[0, 0], [0, 0]], [[2, 3], [4, 5]]]


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"table": torch.randn(16, 8, generator=g, dtype=torch.float64),
              "w": torch.randn(8, 4, generator=g, dtype=torch.float64)}
    ids = torch.randint(0, 16, (4, 6), generator=g)
    return params, ids


def _loss(params, ids):
    return torch.tanh(F.embedding(ids, params["table"]) @ params["w"]).sum()


def _lower(mesh):
    params, ids = _problem()
    step = jit(torch.func.grad_and_value(_loss), mesh=mesh, in_specs=SPECS, out_specs=(SPECS[0], P()))
    local = (shard(params, SPECS[0], mesh), shard(ids, SPECS[1], mesh))
    return step.lower(*local), local


def test_a_vocab_split_table_is_not_gathered():
    lowered, _ = _lower(Mesh.abstract({"dp": 2, "tp": 2}))
    tp = [(c["kind"], c["shape"]) for c in lowered.collectives if c["axes"] == ("tp",)]
    assert tp == [("all_reduce", (4, 6, 8))], tp          # the looked-up rows, summed once


def _run(rank, world):
    mesh = Mesh({"dp": 2, "tp": 2})
    lowered, local = _lower(mesh)
    grads, loss = lowered.run(*local)
    return unshard(grads, SPECS[0], mesh), loss


@pytest.mark.slow
def test_vocab_parallel_lookup_on_four_ranks_equals_one_process():
    params, ids = _problem()
    ref_grads, ref_loss = torch.func.grad_and_value(_loss)(params, ids)
    per_rank = [(loss, grads) for grads, loss in spawn(_run, 4, timeout_s=120)]
    assert_equals_reference(per_rank, ref_loss, ref_grads, 1e-12, "vocab-parallel")
