"""Mixed-precision policy applied by the train step (never by model code).

ZeRO's layout (Rajbhandari et al. 2020, 2 + 2 + 12 bytes per parameter): under bf16/fp16 the step's
parameters are the compute-dtype copy, and the fp32 master parameters live in the optimizer state
(`init_state`) beside Adam's moments, so the strategy's optimizer-state rules shard them: ZeRO-1/2
keep a replicated bf16 parameter and a sharded fp32 master, ZeRO-3 shards both. The step updates
the master and casts it back, so the updated parameters are all-gathered (ZeRO-1/2) in the compute
dtype, and a ZeRO-3 all-gather moves compute-dtype bytes. Gradients come back in the compute dtype
as Partial sums; `reduce_dtype` picks the dtype they are reduced in:

- None (the compute dtype): they are cast to the master dtype after the reduction (the compiler
  reduces a Partial before a widening cast, where it is smaller);
- a wider dtype (float32): they are first added to a zero buffer of that dtype. A sum with zeros
  is linear, so the Partial survives the widening and is reduced in float32.

fp16 adds dynamic loss scaling as pure state in the optimizer state (`init_state`): the loss
is multiplied by `scale`, gradients divided by it; a step whose gradient norm is not finite is
skipped (params and optimizer state unchanged) and halves the scale; `growth_interval` finite
steps in a row double it (torch.amp.GradScaler's rule, as `torch.where`s, so it compiles).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import optim
from .tree import tree_leaves, tree_map

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REDUCE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """compute_dtype None: no casts (full precision). reduce_dtype None: the compute dtype."""

    compute_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    loss_scaling: bool = False
    init_scale: float = 2.0 ** 15
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    @classmethod
    def named(cls, name: str, reduce_dtype: str | None = None, **scaling) -> "Precision":
        """`fp32`, `bf16` or `fp16` (fp16 turns on loss scaling); reduce_dtype: null|float32|bfloat16|float16."""
        if name not in DTYPES:
            raise ValueError(f"unknown precision {name!r}; expected one of {sorted(DTYPES)}")
        if reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"unknown reduce_dtype {reduce_dtype!r}; expected one of {list(REDUCE_DTYPES)}")
        if name == "fp32" and reduce_dtype is not None:
            raise ValueError("reduce_dtype needs a low-precision policy (precision=bf16 or fp16)")
        return cls(DTYPES[name], REDUCE_DTYPES[reduce_dtype], loss_scaling=name == "fp16", **scaling)

    def cast_params(self, params):
        """The compute copy: floating leaves in the compute dtype (the masters are untouched)."""
        if self.compute_dtype is None:
            return params
        return tree_map(lambda p: p.to(self.compute_dtype) if p.is_floating_point() else p, params)

    def to_master(self, grads, params):
        """Compute-dtype gradients -> the masters' dtype, reduced in `reduce_dtype` (see module doc)."""
        if self.compute_dtype is None:
            return grads
        reduce = self.reduce_dtype

        def widen(g, p):
            if reduce is not None and reduce.itemsize > g.dtype.itemsize:
                g = torch.zeros(g.shape, dtype=reduce, device=g.device) + g  # linear: stays Partial
            return g.to(p.dtype)

        return tree_map(widen, grads, params)


def init_state(optimizer: optim.GradientTransformation, params, precision: Precision) -> tuple:
    """(step parameters, optimizer state) the train step expects, from the fp32 `params`.

    fp32: the parameters and the optimizer's own state. bf16/fp16: the parameters cast to the
    compute dtype, and `{"optimizer": ..., "master": params}` (the fp32 masters), plus
    `"loss_scale"` under fp16. The master leaves mirror the parameters' paths, so the strategy's
    optimizer-state rules shard them (`parallel.state_specs`).
    """
    state = optimizer.init(params)
    if precision.compute_dtype is None:
        return params, state
    state = {"optimizer": state, "master": params}
    if precision.loss_scaling:
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        state["loss_scale"] = {"scale": torch.tensor(precision.init_scale, device=device),
                               "good_steps": torch.zeros((), device=device)}
    return precision.cast_params(params), state


def master_params(params, opt_state, precision: Precision):
    """The full-precision parameters of a (params, opt_state) pair: the masters under bf16/fp16."""
    return params if precision.compute_dtype is None else opt_state["master"]


def update_loss_scale(precision: Precision, loss_scale: dict, finite: torch.Tensor) -> dict:
    """Halve the scale on a non-finite step; double it after `growth_interval` finite steps in a row."""
    scale, good = loss_scale["scale"], loss_scale["good_steps"] + 1
    grow = good >= precision.growth_interval
    scale = torch.where(finite, torch.where(grow, scale * precision.growth_factor, scale),
                        scale * precision.backoff_factor)
    good = torch.where(finite & ~grow, good, torch.zeros_like(good))
    return {"scale": scale, "good_steps": good}


def where_finite(finite: torch.Tensor, new, old):
    """`new` where the step was finite, else `old` (leafwise): a skipped step changes nothing."""
    return tree_map(lambda n, o: torch.where(finite, n, o), new, old)
