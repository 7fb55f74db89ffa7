"""Model registry: `build("gpt", "tiny")` binds a config to the pure `init`/`apply`/`loss` functions.

The model modules take `cfg` explicitly; a `Model` closes over it so the train step and the
compiler see the two-argument functions `apply(params, tokens)` and `loss(params, batch)`.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from . import gpt, llama
from .gpt import GPTConfig
from .llama import LlamaConfig

ARCHITECTURES = {"gpt": (gpt, GPTConfig), "llama": (llama, LlamaConfig)}


class Model(NamedTuple):
    """A config bound to its model's pure functions."""

    cfg: GPTConfig | LlamaConfig
    init: Callable[..., dict]  # init(seed, dtype=torch.float32) -> params
    apply: Callable[[dict, torch.Tensor], torch.Tensor]  # apply(params, tokens) -> logits [B, S, V]
    loss: Callable[[dict, dict], torch.Tensor]  # loss(params, batch) -> scalar
    # axes(params) -> the same tree, each leaf a tuple naming the logical axis of every dim
    # ("embed", "heads", "kv_heads", "mlp", "vocab", "positions"; None: a dim with no name; a
    # ("heads", 3) pair: 3 blocks side by side, as a fused q|k|v). Strategies map them to mesh axes.
    axes: Callable[[dict], dict] | None = None
    # eval_loss(params, batch): the loss without dropout (validation), where `loss` draws it; None: `loss`.
    eval_loss: Callable[[dict, dict], torch.Tensor] | None = None


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`, as Megatron pads it (the extra rows are never a target)."""
    multiple = max(multiple, 1)
    return -(-vocab_size // multiple) * multiple


def config(arch: str, size: str, **overrides) -> GPTConfig | LlamaConfig:
    """The named size of an architecture, with field overrides (None values are ignored)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    _, config_cls = ARCHITECTURES[arch]
    return config_cls.named(size, **{k: v for k, v in overrides.items() if v is not None})


def build(arch: str, size: str = "tiny", cfg: GPTConfig | LlamaConfig | None = None, **overrides) -> Model:
    """A `Model` for `arch` ("gpt" or "llama"), from `cfg` or from a named `size` plus overrides."""
    cfg = cfg if cfg is not None else config(arch, size, **overrides)  # also validates `arch`
    module, _ = ARCHITECTURES[arch]
    return Model(
        cfg=cfg,
        init=functools.partial(module.init, cfg),
        apply=functools.partial(module.apply, cfg=cfg),
        loss=functools.partial(module.loss, cfg=cfg),
        axes=module.axes,
    )


__all__ = ["Model", "build", "config", "gpt", "llama", "GPTConfig", "LlamaConfig"]
