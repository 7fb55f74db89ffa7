"""The pure train step: loss, gradient, optimizer update in one function of values.

`train_step(params, opt_state, batch) -> (params, opt_state, metrics)` is exactly the
function the compiler traces (global shapes) and partitions, so it must stay pure: no
mutation of its inputs, no `.item()`, no Python branches on tensor values.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import optim

LossFn = Callable[[dict, dict], torch.Tensor]  # loss(params, batch) -> scalar


def make_train_step(loss_fn: LossFn, optimizer: optim.GradientTransformation) -> Callable:
    """Build `train_step(params, opt_state, batch) -> (params, opt_state, metrics)`.

    metrics = {"loss": the loss before the update, "grad_norm": global norm of the raw
    gradient (before any clipping)}, both 0-dim tensors.
    """
    grad_and_loss = torch.func.grad_and_value(loss_fn)

    def train_step(params, opt_state, batch):
        grads, loss = grad_and_loss(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optim.global_norm(grads)}

    return train_step


def make_eval_step(loss_fn: LossFn) -> Callable:
    """`eval_step(params, batch) -> loss` without building an autograd graph."""

    def eval_step(params, batch):
        with torch.no_grad():
            return loss_fn(params, batch)

    return eval_step
