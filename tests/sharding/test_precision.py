"""Mixed precision as a train-step policy: low-precision collectives, fp32 reductions on request,
fp16 loss scaling that skips and recovers, and every strategy equal to a reference that casts
identically (bf16 tolerance)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from functional_parallel import optim
from functional_parallel.launch import spawn
from functional_parallel.models import build
from functional_parallel.parallel import example_mesh, Strategy, compile_step
from functional_parallel.precision import Precision, init_state
from functional_parallel.train import make_train_step
from functional_parallel.tree import tree_leaves
from sharding import Mesh, shard, unshard

GLOBAL_BATCH = 8


def _problem(adam: bool = True):
    """AdamW for the policy tests; SGD for equivalence (Adam's g/sqrt(v) turns bf16 noise in a
    near-zero gradient into a full-size update of either sign)."""
    model = build("gpt", "tiny")
    params = model.init(0)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1)) if adam \
        else optim.sgd(0.1, momentum=0.9)
    tokens = torch.randint(0, model.cfg.vocab_size, (GLOBAL_BATCH, model.cfg.seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    return model, params, optimizer, batch


def _gradient_collectives(strategy: str, policy: Precision, grad_accum: int = 1):
    model, params, optimizer, batch = _problem()
    numel = sum(p.numel() for p in tree_leaves(params))
    (params, state), mesh = init_state(optimizer, params, policy), Mesh.abstract(example_mesh(strategy))
    step, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer, grad_accum, policy),
                                                 Strategy.load(strategy), mesh, params, state,
                                                 axes=model.axes(params))
    lowered = step.lower(shard(params, pspecs, mesh), shard(state, sspecs, mesh), shard(batch, bspec, mesh))
    bytes_by = Counter()
    for c in lowered.collectives:
        if c["axes"] == ("dp",) and c["shape"] != ():  # not the scalar loss / norm reductions
            bytes_by[c["kind"], c["dtype"]] += c["bytes"]
    return bytes_by, numel


def test_zero3_gathers_and_reduces_in_bf16():
    bytes_by, numel = _gradient_collectives("zero3", Precision.named("bf16"))
    assert set(bytes_by) == {("all_gather", "bfloat16"), ("reduce_scatter", "bfloat16")}
    assert bytes_by["reduce_scatter", "bfloat16"] == 2 * numel  # every gradient once, 2 bytes an element
    assert bytes_by["all_gather", "bfloat16"] >= 2 * numel  # every parameter, plus the backward's re-gathers


@pytest.mark.slow
def test_reduce_dtype_float32_reduces_gradients_in_float32():
    bytes_by, numel = _gradient_collectives("zero3", Precision.named("bf16", reduce_dtype="float32"))
    assert set(bytes_by) == {("all_gather", "bfloat16"), ("reduce_scatter", "float32")}
    assert bytes_by["reduce_scatter", "float32"] == 4 * numel
    bytes_by, numel = _gradient_collectives("dp", Precision.named("bf16", reduce_dtype="float32"))
    assert bytes_by == Counter({("all_reduce", "float32"): 4 * numel})
    # composed with accumulation: micro-batch gradients widen, add up as Partials, reduce once in fp32
    bytes_by, numel = _gradient_collectives("zero3", Precision.named("bf16", reduce_dtype="float32"), grad_accum=2)
    assert bytes_by["reduce_scatter", "float32"] == 4 * numel and ("reduce_scatter", "bfloat16") not in bytes_by


def test_zero2_keeps_bf16_params_and_a_sharded_fp32_master():
    """ZeRO's mixed-precision layout, 2 + 2 + 12 bytes per parameter: the replicated parameter is the
    bf16 copy, the fp32 master shards with Adam's moments, and the updated parameters come back as a
    bf16 all-gather (Rajbhandari et al. 2020, Figure 1)."""
    model, params, optimizer, batch = _problem()
    numel, ranks = sum(p.numel() for p in tree_leaves(params)), 4
    (low, state), mesh = init_state(optimizer, params, Precision.named("bf16")), Mesh.abstract(example_mesh("zero2"))
    step, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer, precision="bf16"),
                                                 Strategy.load("zero2"), mesh, low, state, axes=model.axes(low))
    local_params, local_state = shard(low, pspecs, mesh), shard(state, sspecs, mesh)
    assert sum(p.numel() * p.element_size() for p in tree_leaves(local_params)) == 2 * numel
    for key in ("master",):
        assert sum(p.numel() * p.element_size() for p in tree_leaves(local_state[key])) == 4 * numel // ranks
    lowered = step.lower(local_params, local_state, shard(batch, bspec, mesh))
    gathered = Counter()
    for c in lowered.collectives:
        if c["kind"] == "all_gather":
            gathered[c["dtype"]] += c["bytes"]
    assert gathered == Counter({"bfloat16": 2 * numel})


def test_bad_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        Precision.named("fp8")
    with pytest.raises(ValueError, match="reduce_dtype needs a low-precision policy"):
        Precision.named("fp32", reduce_dtype="float32")


def _fp16_run(init_scale: float, steps: int):
    model, params, optimizer, batch = _problem()
    policy = Precision.named("fp16", init_scale=init_scale)
    step, (params, state) = make_train_step(model.loss, optimizer, precision=policy), \
        init_state(optimizer, params, policy)
    history = []
    for _ in range(steps):
        params, state, metrics = step(params, state, batch)
        history.append((params, state, metrics))
    return history


def test_fp16_loss_scale_skips_on_inf_and_recovers():
    # 2^17 and 2^16 overflow fp16 (max 65504) in the backward: inf gradients, so both steps are skipped
    # (params and Adam state untouched, scale halved); from 2^15 on the run is the one started at 2^15.
    injected, clean = _fp16_run(2.0 ** 17, 5), _fp16_run(2.0 ** 15, 3)
    model, params, optimizer, _ = _problem()
    params, start = init_state(optimizer, params, Precision.named("fp16"))
    for skipped in injected[:2]:
        assert not torch.isfinite(skipped[2]["grad_norm"])
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(skipped[0]), tree_leaves(params)))
        for key in ("optimizer", "master"):
            assert all(torch.equal(a, b) for a, b in zip(tree_leaves(skipped[1][key]), tree_leaves(start[key])))
    assert [h[1]["loss_scale"]["scale"].item() for h in injected] == [2.0 ** 16] + [2.0 ** 15] * 4
    for (got, _, m), (want, _, w) in zip(injected[2:], clean):
        assert torch.isfinite(m["grad_norm"]) and torch.equal(m["loss"], w["loss"])
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(got), tree_leaves(want)))
    assert clean[-1][2]["loss"] < clean[0][2]["loss"]


def test_fp16_loss_scale_grows_after_growth_interval():
    model, params, optimizer, batch = _problem()
    policy = Precision.named("fp16", init_scale=2.0 ** 10, growth_interval=2)
    step, (params, state) = make_train_step(model.loss, optimizer, precision=policy), \
        init_state(optimizer, params, policy)
    scales = []
    for _ in range(4):
        params, state, _ = step(params, state, batch)
        scales.append(state["loss_scale"]["scale"].item())
    assert scales == [2.0 ** 10, 2.0 ** 11, 2.0 ** 11, 2.0 ** 12]


def _reference(policy: Precision, steps: int):
    model, params, optimizer, batch = _problem(adam=False)
    step, (params, state), losses = make_train_step(model.loss, optimizer, precision=policy), \
        init_state(optimizer, params, policy), []
    for _ in range(steps):
        params, state, metrics = step(params, state, batch)
        losses.append(metrics["loss"])
    return state["master"], losses


def _run(rank, world, cases, steps):
    model, params, optimizer, batch = _problem(adam=False)
    out = {}
    for name, policy in cases:
        mesh, (low, state) = Mesh(example_mesh(name)), init_state(optimizer, params, policy)
        step, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer, precision=policy),
                                                     Strategy.load(name), mesh, low, state, axes=model.axes(low))
        p, s, losses = shard(low, pspecs, mesh), shard(state, sspecs, mesh), []
        for _ in range(steps):
            p, s, metrics = step(p, s, shard(batch, bspec, mesh))
            losses.append(metrics["loss"])
        out[name, policy] = (unshard(s, sspecs, mesh)["master"], losses)
    return out


@pytest.mark.slow
def test_low_precision_strategies_equal_a_reference_that_casts_identically():
    bf16, fp16 = Precision.named("bf16"), Precision.named("fp16", init_scale=2.0 ** 16)  # fp16: first step skipped
    cases, steps = [("dp", bf16), ("zero2", bf16), ("zero3", bf16), ("tp_sp", bf16), ("zero3", fp16)], 2
    references = {policy: _reference(policy, steps) for policy in (bf16, fp16)}
    start = _problem()[1]
    for rank_result in spawn(_run, 4, cases, steps, timeout_s=300):
        for name, policy in cases:
            got, losses = rank_result[name, policy]
            want, want_losses = references[policy]
            for a, b in zip(losses, want_losses):
                assert abs(a.float() - b.float()).item() < 2e-2, (name, policy)
            # Each rank rounds its partial sums to the compute dtype before the reduction: compare the
            # whole update (p - p0) with the reference's, relative to its size, within 2 epsilons of that
            # dtype (measured: bf16 3.2e-3..3.8e-3, fp16 4e-4)
            error = optim.global_norm([g - w for g, w in zip(tree_leaves(got), tree_leaves(want))])
            size = optim.global_norm([w - p for w, p in zip(tree_leaves(want), tree_leaves(start))])
            assert error / size < 2 * torch.finfo(policy.compute_dtype).eps, (name, policy)
