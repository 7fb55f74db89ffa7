"""Optimizers equal torch.optim in float64, schedules and clipping are exact, and all of it traces."""
from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from functional_parallel import optim
from functional_parallel.tree import tree_flatten, tree_leaves, tree_map, tree_unflatten


def make_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g, dtype=torch.float64),
            "layers": [{"b": torch.randn(3, generator=g, dtype=torch.float64)},
                       {"b": torch.randn(4, generator=g, dtype=torch.float64)}]}


def grad_sequence(params: dict, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(123)
    return [tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), params)
            for _ in range(steps)]


def run_ours(transform, params, grads_seq):
    state = transform.init(params)
    history = []
    for grads in grads_seq:
        updates, state = transform.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        history.append(params)
    return history


def run_torch(make_optimizer, params, grads_seq):
    leaves, spec = tree_flatten(params)
    tensors = [torch.nn.Parameter(leaf.clone()) for leaf in leaves]
    optimizer = make_optimizer(tensors)
    history = []
    for grads in grads_seq:
        for tensor, grad in zip(tensors, tree_leaves(grads)):
            tensor.grad = grad.clone()
        optimizer.step()
        history.append(tree_unflatten(spec, [t.detach().clone() for t in tensors]))
    return history


def assert_trees_close(actual, expected, tol=1e-12):
    for a, e in zip(tree_leaves(actual), tree_leaves(expected)):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.95)])
def test_adamw_matches_torch(weight_decay, betas):
    params, lr, eps = make_params(), 1e-2, 1e-8
    grads_seq = grad_sequence(params, 10)
    ours = run_ours(optim.adamw(lr, *betas, eps, weight_decay), params, grads_seq)
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, lr, betas, eps, weight_decay, foreach=False),
                       params, grads_seq)
    for step, (a, e) in enumerate(zip(ours, theirs)):
        assert_trees_close(a, e)
    assert not torch.equal(ours[-1]["w"], params["w"])


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [
    (0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.9, False, 0.05), (0.5, True, 0.05),
])
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
    params, lr = make_params(), 0.05
    grads_seq = grad_sequence(params, 10)
    ours = run_ours(optim.sgd(lr, momentum, nesterov, weight_decay), params, grads_seq)
    theirs = run_torch(lambda ps: torch.optim.SGD(ps, lr, momentum=momentum, nesterov=nesterov,
                                                  weight_decay=weight_decay, foreach=False),
                       params, grads_seq)
    for a, e in zip(ours, theirs):
        assert_trees_close(a, e)


def test_adamw_with_schedule_matches_torch_lambda_lr():
    params, peak = make_params(), 1e-2
    schedule = optim.warmup_cosine_schedule(peak, warmup_steps=3, decay_steps=10, end_value=1e-3)
    grads_seq = grad_sequence(params, 10)
    ours = run_ours(optim.adamw(schedule, weight_decay=0.1), params, grads_seq)

    leaves, spec = tree_flatten(params)
    tensors = [torch.nn.Parameter(leaf.clone()) for leaf in leaves]
    optimizer = torch.optim.AdamW(tensors, peak, weight_decay=0.1, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(torch.tensor(step)).item() / peak)
    for expected, grads in zip(ours, grads_seq):
        for tensor, grad in zip(tensors, tree_leaves(grads)):
            tensor.grad = grad.clone()
        optimizer.step()
        scheduler.step()
        assert_trees_close(tree_unflatten(spec, [t.detach() for t in tensors]), expected)


def test_warmup_cosine_values():
    schedule = optim.warmup_cosine_schedule(1.0, warmup_steps=4, decay_steps=12, init_value=0.0, end_value=0.1)
    values = [schedule(torch.tensor(step)).item() for step in range(15)]
    assert values[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-15)
    assert values[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-15)
    assert values[12:] == pytest.approx([0.1] * 3, abs=1e-15)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_torch(max_norm):
    grads = grad_sequence(make_params(), 1)[0]
    clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, {}, None)
    tensors = [torch.nn.Parameter(torch.zeros_like(leaf)) for leaf in tree_leaves(grads)]
    for tensor, leaf in zip(tensors, tree_leaves(grads)):
        tensor.grad = leaf.clone()
    norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    torch.testing.assert_close(optim.global_norm(grads), norm, rtol=1e-14, atol=0)
    for ours, tensor in zip(tree_leaves(clipped), tensors):
        torch.testing.assert_close(ours, tensor.grad, rtol=1e-5, atol=1e-12)  # torch adds 1e-6 to the norm
    if max_norm < norm:
        assert optim.global_norm(clipped).item() == pytest.approx(max_norm, rel=1e-12)


def test_weight_decay_mask_skips_vectors():
    params = make_params()
    zeros = tree_map(torch.zeros_like, params)
    updates, _ = optim.add_decayed_weights(0.5, optim.matrices_only).update(zeros, {}, params)
    torch.testing.assert_close(updates["w"], 0.5 * params["w"])
    assert torch.equal(updates["layers"][0]["b"], torch.zeros(3, dtype=torch.float64))


def test_update_is_pure_and_traces_on_fake_tensors():
    params = make_params()
    transform = optim.chain(optim.clip_by_global_norm(1.0),
                            optim.adamw(optim.warmup_cosine_schedule(1e-2, 2, 10), weight_decay=0.1))
    state = transform.init(params)
    grads = grad_sequence(params, 1)[0]
    snapshot = tree_map(torch.clone, (params, state, grads))
    updates, new_state = transform.update(grads, state, params)
    for before, after in zip(tree_leaves(snapshot),
                             tree_leaves((params, state, grads))):
        assert torch.equal(before, after)
    assert new_state[1][0]["count"].item() == 1 and state[1][0]["count"].item() == 0

    def step(params, state, grads):
        updates, state = transform.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    graph = make_fx(step, tracing_mode="fake")(params, state, grads)
    traced_params, traced_state = graph(params, state, grads)
    expected_params, expected_state = step(params, state, grads)
    assert_trees_close(traced_params, expected_params, tol=1e-15)
    assert not any(node.target == torch.ops.aten._local_scalar_dense.default for node in graph.graph.nodes)
