"""Bucketing merges small collectives of one kind on one group; bytes and results are unchanged."""
from __future__ import annotations

import pytest
import torch

from sharding import collectives

from .lowered import lower

RANKS = 4


def _lower(strategy, **options):
    return lower(strategy, **options)[2]


def _riders(record: dict) -> list[dict]:
    """The 0-dim all-reduces riding in a reduce-scatter bucket."""
    return [m for m in record.get("members", ()) if record["kind"] == "reduce_scatter" and m["kind"] == "all_reduce"]


@pytest.mark.parametrize("strategy", ["dp", "zero3", "tp_sp"])
def test_buckets_keep_the_bytes_and_cut_the_count(strategy):
    """Bucketing moves the same bytes in fewer collectives; a riding all-reduce moves its value once
    per rank's block of the reduce-scatter."""
    plain, bucketed = _lower(strategy, bucket_bytes=0), _lower(strategy, bucket_bytes=16384)
    expected = dict(plain.cost["bytes_by_kind"])
    for record in bucketed.collectives:
        for rider in _riders(record):
            expected["all_reduce"] -= rider["bytes"]
            expected["reduce_scatter"] += RANKS * rider["bytes"]
    assert bucketed.cost["bytes_by_kind"] == {kind: count for kind, count in expected.items() if count}
    assert bucketed.cost["num_collectives"] < plain.cost["num_collectives"]
    assert not any("members" in r for r in plain.collectives)
    for record in bucketed.collectives:
        members = record.get("members")
        if members:
            riders = _riders(record)
            assert record["bytes"] == sum(m["bytes"] for m in members) + (RANKS - 1) * sum(r["bytes"] for r in riders)
            assert record["bytes"] <= 16384 + RANKS * sum(r["bytes"] for r in riders)
            assert {(m["kind"], m["axes"]) for m in members if m not in riders} == {(record["kind"], record["axes"])}
            assert all(r["axes"] == record["axes"] and r["shape"] == () for r in riders)


def test_the_loss_rides_in_the_gradient_reduce_scatter():
    """zero3: the loss's all-reduce (ready after the forward, needed at the end) travels in the
    gradients' reduce-scatter bucket instead of a collective of its own."""
    lowered = _lower("zero3")
    scatter = next(r for r in lowered.collectives if r["kind"] == "reduce_scatter")
    riders = _riders(scatter)
    assert len(riders) == 1 and "loss" in riders[0]["source"] and riders[0]["phase"] == "forward"
    alone = [r for r in _lower("zero3", bucket_bytes=0).collectives if r["kind"] == "all_reduce"]
    assert len([r for r in lowered.collectives if r["kind"] == "all_reduce"]) == len(alone) - 1


def test_per_layer_buckets_gather_and_reduce_one_layer_at_a_time():
    """`bucket_per_layer` (FSDP2's unit): every zero3 bucket holds one layer's leaves; the forward
    gathers layer after layer, each issued as the one before it arrives (one ahead), and less is
    alive at once than with the whole tiny model in one bucket."""
    from sharding.schedule.bucket import layer_of
    from sharding.schedule.chain import chains, positions

    whole, lowered = _lower("zero3"), _lower("zero3", bucket_per_layer=True)
    for record in lowered.collectives:
        layers = {layer_of(m) for m in record.get("members", [record])} - {None}
        assert len(layers) <= 1, record["source"]
    forward = [r for r in lowered.collectives if r["kind"] == "all_gather" and not r.get("regather")]
    assert [layer_of(r["members"][0]) for r in forward] == ["params", "params/blocks/0", "params/blocks/1", "params"]
    scatters = [layer_of(r["members"][0]) for r in lowered.collectives if r["kind"] == "reduce_scatter"]
    assert scatters == ["params", "params/blocks/1", "params/blocks/0", "params"]  # head first, embeddings last
    graph = lowered.graph.graph
    order = positions(graph)
    gathers = sorted((c for c in chains(graph) if c.kind == "all_gather"), key=lambda c: order[c.issue])
    assert all(order[c.front] == order[previous.result] + 1 for previous, c in zip(gathers, gathers[1:]))
    assert lowered.cost["peak_bytes"] < whole.cost["peak_bytes"]
    assert lowered.cost["bytes_by_kind"]["all_gather"] == whole.cost["bytes_by_kind"]["all_gather"]


def test_a_gather_bucket_never_holds_a_parameter_twice():
    """The backward re-gather of a parameter must not join its forward gather (that would keep it alive)."""
    lowered = _lower("zero3")  # the default bucket size holds the whole tiny model
    gathers = [r for r in lowered.collectives if r["kind"] == "all_gather"]
    assert len(gathers) == 2  # forward and backward
    for record in gathers:
        values = [m["value"] for m in record["members"]]
        assert len(values) == len(set(values))


def test_pack_unpack_reduce_scatter_with_a_riding_scalar():
    """A 0-dim member of a reduce-scatter bucket reaches every rank as the sum over ranks."""
    generator = torch.Generator().manual_seed(1)
    per_rank = [[torch.randn(8, 4, generator=generator, dtype=torch.float64),
                 torch.randn((), generator=generator, dtype=torch.float64)] for _ in range(RANKS)]
    total = torch.stack([collectives.pack(xs, [0, 0], RANKS, "reduce_scatter") for xs in per_rank]).sum(0)
    for rank in range(RANKS):
        block, scalar = collectives.unpack(total.chunk(RANKS)[rank], [[2, 4], []], [0, 0], RANKS, "reduce_scatter")
        torch.testing.assert_close(block, sum(xs[0] for xs in per_rank).chunk(RANKS)[rank], rtol=0, atol=1e-12)
        assert scalar.shape == () and torch.allclose(scalar, sum(xs[1] for xs in per_rank), rtol=0, atol=1e-12)


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
