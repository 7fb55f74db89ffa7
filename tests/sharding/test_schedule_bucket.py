"""Bucketing merges small collectives of one kind on one group; bytes and results are unchanged."""
from __future__ import annotations

import pytest
import torch

from sharding import collectives

from .lowered import lower

RANKS = 4


def _lower(strategy, **options):
    return lower(strategy, **options)[2]


@pytest.mark.parametrize("strategy", ["dp", "zero3", "tp_sp"])
def test_buckets_keep_the_bytes_and_cut_the_count(strategy):
    plain, bucketed = _lower(strategy, bucket_bytes=0), _lower(strategy, bucket_bytes=16384)
    assert bucketed.cost["bytes_by_kind"] == plain.cost["bytes_by_kind"]
    assert bucketed.cost["num_collectives"] < plain.cost["num_collectives"]
    assert not any("members" in r for r in plain.collectives)
    for record in bucketed.collectives:
        members = record.get("members")
        if members:
            assert record["bytes"] == sum(m["bytes"] for m in members) <= 16384
            assert {(m["kind"], m["axes"]) for m in members} == {(record["kind"], record["axes"])}


def test_a_gather_bucket_never_holds_a_parameter_twice():
    """The backward re-gather of a parameter must not join its forward gather (that would keep it alive)."""
    lowered = _lower("zero3")  # the default bucket size holds the whole tiny model
    gathers = [r for r in lowered.collectives if r["kind"] == "all_gather"]
    assert len(gathers) == 2  # forward and backward
    for record in gathers:
        values = [m["value"] for m in record["members"]]
        assert len(values) == len(set(values))


def _split(x, dim):
    return list(x.chunk(RANKS, dim=dim))


@pytest.mark.parametrize("dims", [[0, 0, 0], [1, 0, 1]])
def test_pack_unpack_reduce_scatter_matches_per_member(dims):
    """Simulate RANKS ranks: the bucketed reduce-scatter gives each rank its own block of every member."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4,) if dims[1] == 0 else (4, 8), (4, 12)]
    per_rank = [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
                for _ in range(RANKS)]
    flats = [collectives.pack(xs, dims, RANKS, "reduce_scatter") for xs in per_rank]
    total = torch.stack(flats).sum(0)
    for rank in range(RANKS):
        mine = total.chunk(RANKS)[rank]
        front_shapes = [list(collectives.to_front(x, d).shape) for x, d in zip(per_rank[0], dims)]
        front_shapes = [[s[0] // RANKS] + s[1:] for s in front_shapes]
        got = collectives.unpack(mine, front_shapes, dims, RANKS, "reduce_scatter")
        for index, dim in enumerate(dims):
            expected = _split(sum(xs[index] for xs in per_rank), dim)[rank]
            assert torch.equal(got[index], expected)


@pytest.mark.parametrize("dims", [[0, 0], [1, 0]])
def test_pack_unpack_all_gather_rebuilds_every_member(dims):
    generator = torch.Generator().manual_seed(1)
    full = [torch.randn((8, 12), generator=generator), torch.randn((4,), generator=generator)]
    shards = [[_split(x, dim)[rank] for x, dim in zip(full, dims)] for rank in range(RANKS)]
    gathered = torch.cat([collectives.pack(xs, dims, RANKS, "all_gather") for xs in shards])
    front_shapes = [list(collectives.to_front(x, d).shape) for x, d in zip(full, dims)]
    got = collectives.unpack(gathered, front_shapes, dims, RANKS, "all_gather")
    for x, y in zip(got, full):
        assert torch.equal(x, y)
