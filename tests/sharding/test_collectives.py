"""Each strategy lowers to the collectives that define it (abstract mesh: no processes needed)."""
from __future__ import annotations

from collections import Counter

import pytest

import optree

from .lowered import lower as lower_cached

ACTIVATION_DIMS = 3  # [batch, seq, embed]: the residual stream and its gradient


def lower(arch: str, strategy_name: str):
    """The collectives the insert pass places, one per value (no buckets: they are tested apart)."""
    return lower_cached(strategy_name, arch, bucket_bytes=0)


def kinds(lowered, axis, min_dims=0):
    return Counter(c["kind"] for c in lowered.collectives if c["axes"] == (axis,) and len(c["shape"]) >= min_dims)


def param_sized(lowered, params):
    shapes = {tuple(p.shape) for p in optree.tree_leaves(params, namespace="torch")}
    return [c for c in lowered.collectives if c["shape"] in shapes]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_dp_all_reduces_gradients_and_gathers_nothing(arch):
    model, params, lowered = lower(arch, "dp")
    counts = kinds(lowered, "dp")
    assert counts["all_gather"] == 0 and counts["reduce_scatter"] == 0
    n_params = len(optree.tree_leaves(params, namespace="torch"))
    assert len([c for c in param_sized(lowered, params) if c["kind"] == "all_reduce"]) == n_params


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero12_reduce_scatter_gradients_and_gather_parameters(arch, strategy):
    model, params, lowered = lower(arch, strategy)
    n_params = len(optree.tree_leaves(params, namespace="torch"))
    sized = Counter(c["kind"] for c in param_sized(lowered, params))
    assert sized["reduce_scatter"] == n_params and sized["all_gather"] == n_params
    assert sized["all_reduce"] == 0


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_zero3_gathers_parameters_and_reduce_scatters_gradients(arch):
    model, params, lowered = lower(arch, "zero3")
    n_params = len(optree.tree_leaves(params, namespace="torch"))
    # the backward's re-gathers (sharding.schedule.regather) are counted apart, in test_schedule_regather
    sized = Counter(c["kind"] for c in param_sized(lowered, params) if not c.get("regather"))
    assert sized["all_gather"] == n_params and sized["reduce_scatter"] == n_params
    assert sized["all_reduce"] == 0, "no parameter-sized all-reduce under ZeRO-3"


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_tp_is_megatron_two_forward_two_backward_all_reduces_per_layer(arch):
    model, _, lowered = lower(arch, "tp")
    activation = kinds(lowered, "tp", min_dims=ACTIVATION_DIMS)
    assert activation == Counter({"all_reduce": 4 * model.cfg.n_layers})


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_tp_sp_turns_all_reduces_into_gather_and_reduce_scatter(arch):
    model, _, lowered = lower(arch, "tp_sp")
    activation = kinds(lowered, "tp", min_dims=ACTIVATION_DIMS)
    assert activation["all_reduce"] == 0
    assert activation["reduce_scatter"] == 4 * model.cfg.n_layers
    # 2 forward + 2 backward per layer before the column matmuls, plus the final norm's output for the head.
    assert 4 * model.cfg.n_layers <= activation["all_gather"] <= 4 * model.cfg.n_layers + 2


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_fsdp_tp_has_both(arch):
    model, params, lowered = lower(arch, "fsdp_tp")
    assert kinds(lowered, "tp", min_dims=ACTIVATION_DIMS) == Counter({"all_reduce": 4 * model.cfg.n_layers})
    dp = kinds(lowered, "dp")
    assert dp["all_gather"] > 0 and dp["reduce_scatter"] > 0


def test_every_collective_names_a_user_source_line():
    _, _, lowered = lower("gpt", "tp_sp")
    assert all(c["source"] for c in lowered.collectives)
    assert any("gpt.py" in c["source"] for c in lowered.collectives)
