"""Functional optimizers in the optax style: small pure transforms composed with `chain`.

An optimizer is `GradientTransformation(init, update)`:

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # pure: inputs are never mutated
    params = apply_updates(params, updates)             # params + updates

`update` returns *updates* (the optax shape), not new params, so transforms compose: each one
maps the incoming updates to new ones. `apply_updates` is the final add.

Everything traces with `make_fx` on fake tensors, which is how the compiler sees the step:
the step counter is a 0-dim int64 tensor inside the state, and schedules, bias correction and
clipping use tensor ops only (no `.item()`, no Python branches on tensor values, no in-place
ops). Scalar hyperparameter math is done in float64 0-dim tensors, which (by torch's type
promotion for 0-dim tensors) never changes the dtype of the parameter-shaped tensors.
Trees are mapped with `functional_parallel.tree` (optree, namespace "torch", dicts in
insertion order), the one convention used across the project.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from .tree import tree_leaves, tree_map

Tree = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]  # step count (int64, 0-dim) -> value (0-dim)
SCALAR_DTYPE = torch.float64


class GradientTransformation(NamedTuple):
    """A pair of pure functions: `init(params) -> state`, `update(updates, state, params) -> (updates, state)`."""

    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """New params `p + u` (u cast to p's dtype, so low-precision params stay low precision)."""
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def global_norm(tree: Tree) -> torch.Tensor:
    """sqrt of the sum of squares of every leaf, accumulated in at least float32."""
    leaves = tree_leaves(tree)
    total = torch.zeros((), dtype=torch.float32, device=leaves[0].device if leaves else None)
    for leaf in leaves:  # a chain of scalar adds (elementwise), not a `stack`: simpler to partition
        total = total + leaf.to(torch.promote_types(leaf.dtype, torch.float32)).pow(2).sum()
    return total.sqrt()


def _zero_count(params: Tree) -> torch.Tensor:
    """A 0-dim int64 step counter on the params' device (so it traces and shards like them)."""
    leaves = tree_leaves(params)
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _as_schedule(value: float | Schedule) -> Schedule:
    if callable(value):
        return value
    return lambda count: torch.full((), float(value), dtype=SCALAR_DTYPE, device=count.device)


# ----------------------------------------------------------------------------- schedules

def constant_schedule(value: float) -> Schedule:
    """`value` at every step."""
    return _as_schedule(float(value))


def warmup_cosine_schedule(peak_value: float, warmup_steps: int, decay_steps: int,
                           init_value: float = 0.0, end_value: float = 0.0) -> Schedule:
    """Linear warmup from `init_value` to `peak_value`, then cosine decay to `end_value`.

    As optax's `warmup_cosine_decay_schedule`: `decay_steps` counts the warmup too, and the
    value stays at `end_value` after it. Tensor ops only, so it traces.
    """
    if not 0 <= warmup_steps < decay_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < decay_steps ({decay_steps})")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        step = count.to(SCALAR_DTYPE)
        warm = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
        progress = torch.clamp((step - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cosine = end_value + (peak_value - end_value) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        return torch.where(step < warmup_steps, warm, cosine)

    return schedule


# ----------------------------------------------------------------------------- transforms

def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in order; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params):
        new_state = []
        for transform, inner in zip(transforms, state):
            updates, inner = transform.update(updates, inner, params)
            new_state.append(inner)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale updates by min(1, max_norm / ||updates||) (a no-op when the norm is below max_norm)."""

    def update(updates, state, params):
        factor = torch.clamp(max_norm / global_norm(updates).to(SCALAR_DTYPE), max=1.0)
        return tree_map(lambda u: u * factor, updates), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps) with bias correction; state {count, mu, nu}."""

    def init(params):
        zeros = lambda p: torch.zeros_like(p)
        return {"count": _zero_count(params), "mu": tree_map(zeros, params), "nu": tree_map(zeros, params)}

    def update(updates, state, params):
        # torch.optim.AdamW's fused forms (lerp, addcmul), out of place: 8 ops per leaf, not 12
        count = state["count"] + 1
        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - b1), state["mu"], updates)
        nu = tree_map(lambda v, g: torch.addcmul(b2 * v, g, g, value=1 - b2), state["nu"], updates)
        step = count.to(SCALAR_DTYPE)
        correction1, correction2 = 1 - torch.pow(b1, step), 1 - torch.pow(b2, step)
        direction = tree_map(
            lambda m, v: (m / correction1) / (torch.sqrt(v / correction2) + eps), mu, nu)
        return direction, {"count": count, "mu": mu, "nu": nu}

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: t = decay * t + g; emits t (or g + decay * t with Nesterov), as torch.optim.SGD."""

    def init(params):
        return {"momentum": tree_map(torch.zeros_like, params)}

    def update(updates, state, params):
        momentum = tree_map(lambda t, g: decay * t + g, state["momentum"], updates)
        if nesterov:
            updates = tree_map(lambda g, t: g + decay * t, updates, momentum)
        else:
            updates = momentum
        return updates, {"momentum": momentum}

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float, mask: Tree | Callable[[Tree], Tree] | None = None
                        ) -> GradientTransformation:
    """updates + weight_decay * params, on the leaves where `mask` (a tree of bools, or a
    function params -> such a tree) is True; every leaf when `mask` is None."""

    def update(updates, state, params):
        leaf_mask = mask(params) if callable(mask) else mask
        if leaf_mask is None:
            return tree_map(lambda u, p: torch.add(u, p, alpha=weight_decay), updates, params), state
        decay = lambda u, p, m: torch.add(u, p, alpha=weight_decay) if m else u
        return tree_map(decay, updates, params, leaf_mask), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """updates * -learning_rate(count); the state keeps the step count the schedule reads."""
    schedule = _as_schedule(learning_rate)

    def update(updates, state, params):
        rate = schedule(state["count"])
        return tree_map(lambda u: -rate * u, updates), {"count": state["count"] + 1}

    return GradientTransformation(lambda params: {"count": _zero_count(params)}, update)


def matrices_only(params: Tree) -> Tree:
    """A weight-decay mask: True for leaves with 2+ dims (weights, embeddings), False for
    biases and norm scales, the usual GPT/Llama recipe."""
    return tree_map(lambda p: p.dim() >= 2, params)


# ----------------------------------------------------------------------------- aliases

def sgd(learning_rate: float | Schedule, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> GradientTransformation:
    """torch.optim.SGD: coupled (L2) weight decay, then momentum, then the learning rate."""
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adamw(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, mask: Tree | Callable[[Tree], Tree] | None = None
          ) -> GradientTransformation:
    """torch.optim.AdamW: Adam direction plus decoupled weight decay, both scaled by the rate."""
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
