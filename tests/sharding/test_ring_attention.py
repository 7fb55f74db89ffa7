"""Ring attention from specs: SDPA whose queries, keys and values are split on the sequence over cp
runs as a ring (each key/value block passes from rank to rank, merged by the online softmax), so the
only traffic on cp inside attention is point-to-point and no rank holds the whole sequence.

Per layer, the forward sends k and v on P-1 times, the backward k, v and their gradients P-1 times
and the gradients once more (home): 2(P-1)·N·h/P and (2(P-1) + 1)·2·N·h/P elements per rank, h the
width of k and v as they reach SDPA."""
from __future__ import annotations

import pytest
import torch

from functional_parallel.launch import spawn
from sharding import Mesh, P, jit, shard, striped, unshard
from sharding import ring_attention
from sharding.errors import PropagationError

from .lowered import lower

F32 = 4


def _activation(record) -> bool:
    return len(record["shape"] or ()) >= 3


@pytest.mark.parametrize("arch,strategy", [("gpt", "ring"), ("llama", "ring"), ("gpt", "tp_cp")])
def test_attention_moves_key_value_blocks_point_to_point_and_nothing_gathers_the_sequence(arch, strategy):
    model, _, lowered = lower(strategy, arch, bucket_bytes=0)
    on_cp = [r for r in lowered.collectives if "cp" in r["axes"]]
    assert {r["kind"] for r in on_cp if _activation(r)} == {"p2p"}
    assert {r["kind"] for r in on_cp if not _activation(r)} == {"all_reduce"}  # gradients and the loss
    layers = model.cfg.n_layers
    rings = [r for r in on_cp if r["kind"] == "p2p"]
    assert [r["ring"] for r in rings].count("forward") == layers == [r["ring"] for r in rings].count("backward")
    assert lowered.cost["bytes_by_kind"]["p2p"] == sum(r["bytes"] for r in rings)  # the cost walk runs the ring


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_bytes_per_layer_are_the_ring_formula(arch):
    model, _, lowered = lower("ring", arch, bucket_bytes=0)
    cfg, cp = model.cfg, 2
    tokens = (8 // 2) * cfg.seq_len  # dp = 2 takes the global batch of 8
    # Llama's k and v reach SDPA expanded to every query head (GQA's repeat precedes it), so the
    # ring passes h, not h_kv, per token: DeepSpeed and Megatron pass the kv heads only.
    kv_block = 2 * tokens * cfg.d_model // cp * F32  # this rank's k and v
    for record in (r for r in lowered.collectives if r["kind"] == "p2p"):
        expected = (cp - 1) * kv_block if record["ring"] == "forward" else (2 * (cp - 1) + 1) * kv_block
        assert record["bytes"] == expected == ring_attention.bytes_sent(kv_block, cp, record["ring"] == "backward")


def _attention(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).pow(2).sum()


def _sdpa_problem():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3)]


def _ring_ranks(rank, world, layout):
    mesh = Mesh({"cp": world})
    spec = P(None, None, striped("cp") if layout == "striped" else "cp")
    step = jit(torch.func.grad_and_value(_attention, argnums=(0, 1, 2)), mesh=mesh, in_specs=(spec,) * 3,
               out_specs=((spec,) * 3, P()), data_argnums=(0, 1, 2), bucket_bytes=0)
    local = [shard(x, spec, mesh) for x in _sdpa_problem()]
    grads, value = step(*local)
    return [unshard(g, spec, mesh) for g in grads], value


@pytest.mark.parametrize("layout", ["blocks", "striped"])
@pytest.mark.parametrize("world", [2, 3])
def test_causal_ring_attention_equals_sdpa_on_every_rank(world, layout):
    """Three ranks as well as two: every block order (before, diagonal, after) is met; in blocks
    (rank r holds one run of the sequence) and striped (rank r holds tokens r, r + P, ...)."""
    q, k, v = _sdpa_problem()
    expected = torch.func.grad_and_value(_attention, argnums=(0, 1, 2))(q, k, v)
    for grads, value in spawn(_ring_ranks, world, layout, timeout_s=120):
        torch.testing.assert_close(value, expected[1], rtol=0, atol=1e-12)
        for got, want in zip(grads, expected[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_an_explicit_mask_under_a_sequence_split_is_a_clear_error():
    mesh = Mesh.abstract({"cp": 2})
    spec = P(None, None, "cp")
    mask = torch.ones(12, 12, dtype=torch.bool).tril()

    def masked(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()

    step = jit(masked, mesh=mesh, in_specs=(spec,) * 3, out_specs=P(), data_argnums=(0, 1, 2))
    with pytest.raises(PropagationError, match="ring attention .* not an explicit attn_mask"):
        step.lower(*[shard(x, spec, mesh) for x in _sdpa_problem()])


def test_no_rank_holds_a_whole_sequence_of_attention_activations():
    """Every 4-D value of the per-rank ring graph ([b, h, s, d] and [b, s, h, d]: q, k, v, the
    attention output and their gradients) holds 1/cp of the sequence (the tiny GPT's sequence, 16,
    is no other dim's size); the ring's own buffers hold two blocks at most."""
    from sharding.layout import Layout, layout_of

    model, _, lowered = lower("ring", "gpt", bucket_bytes=0)
    seq, cp = model.cfg.seq_len, 2
    four_dim = 0
    for node in lowered.graph.graph.nodes:
        value, layout = node.meta.get("val"), layout_of(node)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and isinstance(layout, Layout):
            four_dim += 1
            local = layout.local_shape(value.shape, (2, cp))
            for dim, size in enumerate(value.shape):  # the sequence dim, head-major or token-major
                if size == seq:
                    assert local[dim] == seq // cp, (node.name, tuple(value.shape), local)
    assert four_dim > 0


def _work(rank: int, size: int, tokens: int, striped: bool) -> int:
    """(query, key) pairs rank `rank` computes in one causal ring pass, `tokens` per rank."""
    pairs = {"all": tokens * tokens, "causal": tokens * (tokens + 1) // 2, "strict": tokens * (tokens - 1) // 2,
             None: 0}
    return sum(pairs[ring_attention._visible(block, rank, True, striped)] for block in range(size))


@pytest.mark.parametrize("size", [2, 4, 8])
def test_striped_causal_ring_gives_every_rank_the_same_work(size):
    """In blocks, rank r computes r + 1 of the P blocks; striped, every block is a triangle and the
    ranks differ by their diagonals only (one pair per query)."""
    tokens = 64
    blocks = [_work(r, size, tokens, striped=False) for r in range(size)]
    dealt = [_work(r, size, tokens, striped=True) for r in range(size)]
    assert sum(blocks) == sum(dealt) == (size * tokens) * (size * tokens + 1) // 2  # the causal triangle
    assert max(blocks) - min(blocks) == (size - 1) * tokens * tokens
    assert max(dealt) - min(dealt) == (size - 1) * tokens


def test_the_ring_strategies_stripe_the_sequence():
    """ring and tp_cp load every cp-th token on each rank, so their causal rings are balanced."""
    for strategy in ("ring", "tp_cp"):
        model, _, lowered = lower(strategy, "gpt", bucket_bytes=0)
        assert lowered.graph.graph is not None
        rings = [n for n in lowered.graph.graph.nodes if n.target is ring_attention.ring_attention_forward]
        assert rings and all(n.args[-1] is True for n in rings), strategy  # striped=True
