"""Chunked splits (`chunked("tp", 3)`, layout `Strided`): a fused q/k/v weight split over tp
without a gather. Layout and collectives alone, then one lowering, then 2 gloo ranks."""
from __future__ import annotations

import pytest
import torch

from functional_parallel.launch import spawn
from sharding import Mesh, P, chunked, jit, shard, unshard
from sharding import collectives
from sharding.layout import REPLICATE, Strided, layout_from_spec

from .equivalence import assert_equals_reference


def test_chunked_spec_is_a_strided_layout_and_round_trips():
    layout = layout_from_spec(P(None, chunked("tp", 3)), (4, 12), ("dp", "tp"), (2, 2))
    assert layout.placements == (REPLICATE, Strided(1, 3))
    assert layout.local_shape((4, 12), (2, 2)) == [4, 6]
    assert layout.to_spec(2, ("dp", "tp")) == P(None, "tp") and layout.to_spec(2, ("dp", "tp"))[1].chunks == 3


def test_each_rank_holds_its_block_of_every_chunk():
    x = torch.arange(12).view(1, 12)                       # chunks [0..3], [4..7], [8..11]
    blocks = [collectives.strided_slice(x, 1, 3, rank, 2) for rank in range(2)]
    assert blocks[0].tolist() == [[0, 1, 4, 5, 8, 9]] and blocks[1].tolist() == [[2, 3, 6, 7, 10, 11]]
    assert torch.equal(collectives.interleave(torch.cat(blocks, 1), 1, 3, 2), x)   # all-gather, then reorder
    assert torch.equal(collectives.deinterleave(x, 1, 3, 2), torch.cat(blocks, 1))  # before a reduce-scatter
    assert torch.equal(shard(x, P(None, chunked("tp", 3)), Mesh.abstract({"tp": 2})), blocks[0])


def test_chunked_spec_must_divide_every_chunk():
    with pytest.raises(Exception, match=r"dim 1 has size 9, not divisible by 6"):
        layout_from_spec(P(None, chunked("tp", 3)), (4, 9), ("tp",), (2,))


def _fused(w, x):
    q, k, v = (x @ w).split(w.shape[0], dim=-1)            # [b, d] each
    return ((q * k).tanh() * v).sum()


def _lower(mesh, w, x):
    step = jit(torch.func.grad_and_value(_fused), mesh=mesh, in_specs=(P(None, chunked("tp", 3)), P()),
               out_specs=(P(None, chunked("tp", 3)), P()))
    local_w = shard(w, P(None, chunked("tp", 3)), mesh)
    return step.lower(local_w, x), local_w


def _problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 12, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)


def test_fused_qkv_splits_into_q_k_v_without_a_gather():
    lowered, _ = _lower(Mesh.abstract({"tp": 2}), *_problem())
    assert [c["kind"] for c in lowered.collectives] == ["all_reduce"], lowered.collectives  # the loss only


def _run(rank, world):
    w, x = _problem()
    mesh = Mesh({"tp": 2})
    lowered, local_w = _lower(mesh, w, x)
    grad, loss = lowered.run(local_w, x)
    return unshard(grad, P(None, chunked("tp", 3)), mesh), loss


@pytest.mark.slow
def test_fused_qkv_on_two_ranks_equals_one_process():
    w, x = _problem()
    ref_grad, ref_loss = torch.func.grad_and_value(_fused)(w, x)
    per_rank = [(loss, grad) for grad, loss in spawn(_run, 2, timeout_s=120)]
    assert_equals_reference(per_rank, ref_loss, ref_grad, 1e-12, "fused qkv")
