"""DeepSpeed-Ulysses from specs: the residual stream split on its sequence over sp, attention split on
its heads, and the layout change between them an all-to-all (no attention-specific code: the
models state attention's token-major and head-major layouts, the strategy maps both to sp).

Per layer and direction, q, k, v go in and the output comes back: 4 all-to-alls of a rank's
b·s·h/sp tokens (DeepSpeed-Ulysses' 4Nh/P), where Megatron SP moves 4 b·s·h (2 all-gathers and
2 reduce-scatters). Grouped-query k and v carry their kv heads only."""
from __future__ import annotations

import pytest

from functional_parallel.parallel import lower_abstract
from sharding import P
from sharding.constrain import resolve_logical
from sharding.errors import SpecError

from .lowered import lower

F32 = 4


def _tokens_per_rank(model, mesh_dp: int) -> int:
    return (8 // mesh_dp) * model.cfg.seq_len  # the tiny models' global batch is 8


def _activation(record) -> bool:
    return len(record["shape"] or ()) >= 3


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_attention_is_entered_and_left_by_all_to_all_and_no_activation_is_gathered(arch):
    model, _, lowered = lower("ulysses", arch, bucket_bytes=0)
    on_sp = [r for r in lowered.collectives if "sp" in r["axes"]]
    assert {r["kind"] for r in on_sp if _activation(r)} == {"all_to_all"}
    assert {r["kind"] for r in on_sp if not _activation(r)} == {"all_reduce"}  # gradients and the loss
    assert all(r["axes"] == ("dp", "sp") for r in on_sp if r["kind"] == "all_reduce")
    moves = [r for r in on_sp if r["kind"] == "all_to_all"]
    layers = model.cfg.n_layers
    for phase in ("forward", "backward"):
        assert len([r for r in moves if r["phase"] == phase]) == 4 * layers, phase


def _all_to_all_bytes_per_layer(strategy, arch, phase):
    model, _, lowered = lower(strategy, arch, bucket_bytes=0)
    moved = sum(r["bytes"] for r in lowered.collectives if r["kind"] == "all_to_all" and r["phase"] == phase)
    return model, moved / model.cfg.n_layers


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_bytes_per_layer_are_ulysses_4Nh_over_P(phase):
    model, per_layer = _all_to_all_bytes_per_layer("ulysses", "gpt", phase)
    tokens, h, sp = _tokens_per_rank(model, 2), model.cfg.d_model, 2
    assert per_layer == 4 * tokens * h // sp * F32


def test_grouped_query_k_and_v_move_their_kv_heads_only():
    model, per_layer = _all_to_all_bytes_per_layer("ulysses", "llama", "forward")
    cfg = model.cfg
    tokens, h, h_kv, sp = _tokens_per_rank(model, 2), cfg.d_model, cfg.kv_heads * cfg.head_dim, 2
    assert cfg.kv_heads < cfg.n_heads
    assert per_layer == (2 * h + 2 * h_kv) * tokens // sp * F32


def test_ulysses_moves_one_sp_th_of_megatron_sp_on_the_same_model():
    """Both on a 2 x 2 mesh, the same model and batch: Megatron SP's forward activation bytes per
    layer (gathers and reduce-scatters of b·s·h) are sp times Ulysses' all-to-alls."""
    model, ulysses = _all_to_all_bytes_per_layer("ulysses", "gpt", "forward")
    _, _, tp_sp = lower("tp_sp", "gpt", bucket_bytes=0)
    megatron = sum(r["bytes"] for r in tp_sp.collectives if r["phase"] == "forward" and _activation(r)
                   and r["kind"] in ("all_gather", "reduce_scatter")) / model.cfg.n_layers
    assert megatron == 4 * _tokens_per_rank(model, 2) * model.cfg.d_model * F32
    assert megatron == 2 * ulysses


def test_a_head_count_the_axis_does_not_divide_is_a_clear_error():
    with pytest.raises(SpecError, match=r"size 2, not divisible by 4 \(mesh axes \('sp',\).*logical name"):
        lower_abstract("llama", "tiny", "ulysses", {"dp": 1, "sp": 4}, global_batch=4)  # 2 kv heads


def test_a_mesh_axis_named_by_two_dims_goes_to_the_first():
    rules = {"batch": "dp", "heads": "sp", "attention_seq": "sp"}
    assert resolve_logical(("batch", "heads", "attention_seq", None), rules) == P("dp", "sp", None, None)
    assert resolve_logical(("batch", "attention_seq", "heads", None), rules) == P("dp", "sp", None, None)
    assert resolve_logical(("batch", "seq"), {"batch": ["dp", "sp"], "seq": "sp"}) == P(("dp", "sp"), None)
