"""The ZeRO and Megatron formulas hold exactly on the tiny GPT (AdamW, float32, abstract meshes).

Ψ is the parameter count and P the data-parallel size. Conventions (see `sharding.cost`): a
collective record's `bytes` is its full buffer per rank on its axis (an all-gather's output, a
reduce-scatter's input, an all-reduce's tensor); bucketed records hold their members.
Model state per rank is read from what the lowered step holds: parameter and optimizer-state
inputs as this rank's shards, and each gradient as the optimizer consumes it, i.e. the output
of its gradient reduction (an all-reduce keeps the full tensor, a reduce-scatter a 1/P shard).
"""
from __future__ import annotations

import pytest

from functional_parallel import optim
from functional_parallel.models import build
from functional_parallel.parallel import example_mesh, Strategy, param_specs, state_specs
from functional_parallel.tree import leaf_paths, tree_leaves
from sharding import Mesh, shard

from .lowered import lower

F32 = 4
LOSS_SCALARS = 2 * F32       # the loss's sum and its token count, all-reduced over dp
GRAD_NORM_SCALARS = 2 * F32  # sum of squared gradient shards: once to clip, once for the metric
# The backward never reads these gathered parameters (embedding backward scatters into zeros, a
# bias gradient sums the output gradient), and the head's backward follows its forward at once,
# so ZeRO-3 gathers them once, not twice.
NOT_REGATHERED = ("wte", "wpe", "head", "b_in", "b_out")


def _riding_loss(p: int) -> int:
    """The loss's sum rides in the gradients' reduce-scatter bucket: each of the P ranks' blocks
    carries it, so it moves P times where its own all-reduce moved it once."""
    return (p - 1) * F32


def _lower(strategy, **options):
    return lower(strategy, **options)


def _records(lowered, kind=None, axis=None):
    flat = [m for r in lowered.collectives for m in r.get("members", [r])]
    axes = axis if isinstance(axis, tuple) else (axis,)  # a tuple: a joint group ("dp", "tp")
    return [r for r in flat if (kind is None or r["kind"] == kind) and (axis is None or r["axes"] == axes)]


def _bytes(lowered, kind, axis):
    return sum(r["bytes"] for r in _records(lowered, kind, axis))


def _numel(tree, keep=lambda path: True):
    return sum(x.numel() for path, x in zip(leaf_paths(tree), tree_leaves(tree)) if keep(path))


def _model_state(strategy):
    """(param bytes, grad bytes, optimizer-state bytes) per rank, and Ψ, P."""
    model = build("gpt", "tiny")
    params = model.init(0)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = optimizer.init(params)
    plan = Strategy.load(strategy)
    mesh = Mesh.abstract(example_mesh(strategy))
    local_params = shard(params, param_specs(plan, params, model.axes(params)), mesh)
    local_state = shard(state, state_specs(plan, state, params, model.axes(params)), mesh)
    moments = [x for path, x in zip(leaf_paths(local_state), tree_leaves(local_state)) if "/mu/" in f"/{path}/"
               or "/nu/" in f"/{path}/"]
    _, _, lowered = _lower(strategy)
    shapes = {tuple(x.shape) for x in tree_leaves(params)}
    dp = example_mesh(strategy)["dp"]
    grads = [r["bytes"] if r["kind"] == "all_reduce" else r["bytes"] // dp
             for r in _records(lowered, axis="dp") if r["kind"] in ("all_reduce", "reduce_scatter")
             and r["shape"] in shapes]
    return (_numel(local_params) * F32, sum(grads), sum(m.numel() for m in moments) * F32,
            _numel(params), dp)


def test_dp_model_state_is_16_psi():
    params, grads, adam, psi, _ = _model_state("dp")
    assert (params, grads, adam) == (4 * psi, 4 * psi, 8 * psi)


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero12_model_state(strategy):
    """ZeRO-2: 4Ψ + 12Ψ/P. ZeRO-1's formula is 8Ψ + 8Ψ/P (full reduced gradients); the compiled
    step reduce-scatters each gradient straight into the optimizer's shard, so ZeRO-1 lowers to
    the ZeRO-2 program and holds 4Ψ + 12Ψ/P too (4Ψ - 4Ψ/P less than its formula)."""
    params, grads, adam, psi, p = _model_state(strategy)
    assert (params, grads, adam) == (4 * psi, 4 * psi // p, 8 * psi // p)


def test_zero3_model_state_is_16_psi_over_p():
    params, grads, adam, psi, p = _model_state("zero3")
    assert (params, grads, adam) == (4 * psi // p, 4 * psi // p, 8 * psi // p)


def test_dp_traffic_is_one_all_reduce_of_the_gradients():
    _, params, lowered = _lower("dp")
    psi = _numel(params)
    assert _bytes(lowered, "all_reduce", "dp") == 4 * psi + LOSS_SCALARS
    assert lowered.cost["bytes_moved"] == 4 * psi + LOSS_SCALARS


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero12_traffic_is_reduce_scatter_plus_all_gather(strategy):
    _, params, lowered = _lower(strategy)
    psi = _numel(params)
    assert _bytes(lowered, "reduce_scatter", "dp") == 4 * psi
    assert _bytes(lowered, "all_gather", "dp") == 4 * psi
    assert _bytes(lowered, "all_reduce", "dp") == LOSS_SCALARS + GRAD_NORM_SCALARS
    assert lowered.cost["bytes_moved"] == 8 * psi + LOSS_SCALARS + GRAD_NORM_SCALARS \
        + _riding_loss(example_mesh(strategy)["dp"])


def test_zero3_traffic_is_forward_and_backward_gathers_plus_reduce_scatter():
    """2·Ψ·4 all-gather minus the parameters the backward does not read (listed above)."""
    _, params, lowered = _lower("zero3")
    psi = _numel(params)
    skipped = _numel(params, lambda path: path.split("/")[-1] in NOT_REGATHERED)
    forward = [r for r in _records(lowered, "all_gather", "dp") if not r.get("regather")]
    backward = [r for r in _records(lowered, "all_gather", "dp") if r.get("regather")]
    assert sum(r["bytes"] for r in forward) == 4 * psi
    assert sum(r["bytes"] for r in backward) == 4 * (psi - skipped)
    assert _bytes(lowered, "reduce_scatter", "dp") == 4 * psi
    assert _bytes(lowered, "all_reduce", "dp") == LOSS_SCALARS + GRAD_NORM_SCALARS


def _activation_bytes(strategy):
    model = build("gpt", "tiny")
    mesh = example_mesh(strategy)
    batch = 8 // mesh["dp"]
    return model.cfg.n_layers, batch * model.cfg.seq_len * model.cfg.d_model * F32  # b·s·h per rank


def _is_activation(record):
    return len(record["shape"] or ()) == 3


def test_tp_is_two_forward_two_backward_all_reduces_of_bsh_per_layer():
    layers, bsh = _activation_bytes("tp")
    _, params, lowered = _lower("tp")
    activation = [r for r in _records(lowered, axis="tp") if _is_activation(r)]
    assert [r["kind"] for r in activation] == ["all_reduce"] * 4 * layers
    assert sum(r["bytes"] for r in activation) == 4 * layers * bsh
    # the rest on tp: the two global-norm scalars (each rank holds part of the split weights)
    assert _bytes(lowered, "all_reduce", "tp") - 4 * layers * bsh == GRAD_NORM_SCALARS


def test_tp_sp_moves_the_same_volume_as_gather_plus_reduce_scatter():
    """Megatron SP: each of TP's 4 all-reduces per layer becomes an all-gather + reduce-scatter of
    b·s·h, and nothing else on activations: the head (its weight replicated) and the per-token loss
    run on the sequence-split stream, so the final norm's output is never gathered. The gradients
    of replicated parameters computed from sequence-split activations (layer norms, b_out, wte,
    wpe, head), sums over the batch and the sequence, are all-reduced once over dp and tp jointly."""
    layers, bsh = _activation_bytes("tp_sp")
    model, params, lowered = _lower("tp_sp")
    gathers = [r for r in _records(lowered, "all_gather", "tp") if _is_activation(r)]
    scatters = [r for r in _records(lowered, "reduce_scatter", "tp") if _is_activation(r)]
    assert sum(r["bytes"] for r in scatters) == 4 * layers * bsh
    assert sum(r["bytes"] for r in gathers) == 4 * layers * bsh
    sequence_split_grads = _numel(params, lambda path: path.split("/")[-2:-1] in (["ln1"], ["ln2"], ["ln_f"])
                                  or path.split("/")[-1] in ("b_out", "wte", "wpe", "head"))
    loss = F32  # the loss, a sum over the tokens each rank holds
    assert _bytes(lowered, "all_reduce", ("dp", "tp")) == 4 * sequence_split_grads + loss
    assert _bytes(lowered, "all_reduce", "tp") == GRAD_NORM_SCALARS
    assert not [r for r in _records(lowered, axis="tp") if r["kind"] == "all_reduce" and _is_activation(r)]
