"""The pure train step: loss, gradient, optimizer update in one function of values.

`train_step(params, opt_state, batch) -> (params, opt_state, metrics)` is exactly the
function the compiler traces (global shapes) and partitions, so it must stay pure: no
mutation of its inputs, no `.item()`, no Python branches on tensor values.

Gradient accumulation (`grad_accum=N`) runs N micro-batches inside that one step and makes
one optimizer update from the mean of their gradients. Each rank's micro-batch i is rows
i, i+N, i+2N, ... of its own local batch (a reshape that keeps the batch split, see
`microbatches`), so under the compiler every micro-batch gradient is a Partial sum over the
data axes; the Partials add up locally and are reduced once per step, not once per micro-batch.
Each micro-batch runs under `sharding.microbatch(i)`, so a pipeline (`sharding.Pipeline`) can
schedule its forward and backward on every stage.
"""
from __future__ import annotations

from typing import Callable

import torch

from sharding import microbatch

from . import optim
from .precision import Precision, update_loss_scale, where_finite
from .tree import tree_leaves, tree_map

LossFn = Callable[[dict, dict], torch.Tensor]  # loss(params, batch) -> scalar


def microbatches(batch: dict, n: int) -> list[dict]:
    """Split every leaf of `batch` along dim 0 into `n` strided micro-batches (row r goes to r % n).

    Strided rather than contiguous: `[B, ...] -> [B/n, n, ...]` keeps a split of dim 0 on the
    leading B/n dim, so a rank's micro-batches come from its own rows and nothing moves. With
    equal-sized micro-batches the mean of their mean-losses is the full batch's mean loss, so
    the row order does not change the result.
    """
    sizes = {leaf.shape[0] for leaf in tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"grad_accum: batch leaves disagree on dim 0 {sorted(sizes)}")
    size = sizes.pop()
    if size % n:
        raise ValueError(f"grad_accum={n} does not divide the batch of {size} rows")
    return [tree_map(lambda x, i=i: x.reshape(size // n, n, *x.shape[1:])[:, i], batch) for i in range(n)]


def check_local_batch(batch_rows: int, batch_shards: int, grad_accum: int) -> None:
    """Each rank's local batch (`batch_rows / batch_shards`) must split into `grad_accum` micro-batches.

    Called before tracing, so a bad combination fails with this message before any collective runs
    (otherwise the reshape would silently gather the batch onto every rank).
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if batch_rows % batch_shards or (batch_rows // batch_shards) % grad_accum:
        raise ValueError(f"grad_accum={grad_accum}: the global batch of {batch_rows} rows over {batch_shards} "
                         f"data-parallel ranks gives {batch_rows / batch_shards:g} rows per rank, which does not "
                         f"split into {grad_accum} equal micro-batches; use a global batch divisible by "
                         f"{batch_shards * grad_accum}")


def make_train_step(loss_fn: LossFn, optimizer: optim.GradientTransformation, grad_accum: int = 1,
                    precision: Precision | str = "fp32") -> Callable:
    """Build `train_step(params, opt_state, batch) -> (params, opt_state, metrics)`.

    With `grad_accum=N` the batch is split into N micro-batches (`microbatches`); their gradients
    and losses are averaged and one update is made, equal to the update on the whole batch.
    `precision` (a `Precision` or its name): under bf16/fp16 `params` are the compute-dtype copy and
    `opt_state` holds the fp32 masters (`precision.init_state`); the step differentiates the copy,
    widens the gradients, updates the masters and returns them cast again.
    metrics = {"loss": the loss before the update, "grad_norm": global norm of the raw
    (accumulated, unscaled) gradient, before any clipping}, both 0-dim tensors.
    """
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
    policy = Precision.named(precision) if isinstance(precision, str) else precision

    def reported_loss(low_params, batch):
        loss = loss_fn(low_params, batch)
        return loss.to(torch.promote_types(loss.dtype, torch.float32))  # a low-precision loss is reported in fp32

    def scaled_loss(low_params, batch, scale):
        loss = reported_loss(low_params, batch)
        return loss * scale, loss

    if policy.loss_scaling:
        grad_and_loss = torch.func.grad(scaled_loss, has_aux=True)
    else:
        unscaled = torch.func.grad_and_value(reported_loss)

        def grad_and_loss(low_params, batch, scale):
            return unscaled(low_params, batch)

    def accumulated_grad_and_loss(low, master, batch, scale):
        grads, loss = None, None
        for index, micro in enumerate(microbatches(batch, grad_accum) if grad_accum > 1 else [batch]):
            with microbatch(index):  # what a pipeline schedules (`sharding.microbatch`); else nothing
                g, l = grad_and_loss(low, micro, scale)
                g = policy.to_master(g, master)
                grads = g if grads is None else tree_map(torch.add, grads, g)
                loss = l if loss is None else loss + l
        if grad_accum > 1 or policy.loss_scaling:
            divisor = scale * grad_accum if policy.loss_scaling else grad_accum
            grads, loss = tree_map(lambda g: g / divisor, grads), loss / grad_accum
        return grads, loss

    def train_step(params, opt_state, batch):
        low_precision = policy.compute_dtype is not None
        master = opt_state["master"] if low_precision else params
        inner = opt_state["optimizer"] if low_precision else opt_state
        scaling = opt_state.get("loss_scale") if low_precision else None
        grads, loss = accumulated_grad_and_loss(params, master, batch, scaling["scale"] if scaling else 1.0)
        updates, new_inner = optimizer.update(grads, inner, master)
        new_master = optim.apply_updates(master, updates)
        grad_norm = optim.global_norm(grads)  # after the update: graph order moves the estimated peak
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if not low_precision:
            return new_master, new_inner, metrics
        new_state = {"optimizer": new_inner, "master": new_master}
        if scaling is not None:
            finite = torch.isfinite(grad_norm)
            new_state = {**where_finite(finite, new_state, {"optimizer": inner, "master": master}),
                         "loss_scale": update_loss_scale(policy, scaling, finite)}
        return policy.cast_params(new_state["master"]), new_state, metrics

    train_step.grad_accum = grad_accum  # read by `parallel.compile_step` to check each rank's batch
    train_step.precision = policy
    return train_step


def make_eval_step(loss_fn: LossFn) -> Callable:
    """`eval_step(params, batch) -> loss` without building an autograd graph."""

    def eval_step(params, batch):
        with torch.no_grad():
            return loss_fn(params, batch)

    return eval_step
