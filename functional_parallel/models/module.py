"""Any `torch.nn.Module` language model as the project's pure `Model`: parameters become a pytree.

`make_functional(module, ...)` keeps the module as a fixed program and lifts its parameters out:
`init(seed)` returns `{name: tensor}` as `named_parameters()` gives them, and `apply(params, tokens)`
runs the module on those tensors through `torch.func.functional_call`, so the train step, the
optimizers and the sharding compiler see the same two-argument functions as the project's own
models, and a user's model needs no rewrite to be trained under every strategy.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sharding import checkpoint_name, constrain
from sharding.checkpoint_name import LAYER_INPUT

from . import Model
from ._init_utils import is_abstract


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    """What the trainer reads from a model built around an `nn.Module`."""

    name: str
    seq_len: int
    vocab_size: int


def is_hf_model(module: torch.nn.Module) -> bool:
    """True for a Hugging Face `PreTrainedModel` (without importing transformers when it is absent)."""
    transformers = sys.modules.get("transformers")  # a PreTrainedModel exists only once it is imported
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _reset_hf(module: torch.nn.Module) -> None:
    """Re-run a `PreTrainedModel`'s own init (`init_weights`: `_init_weights` per submodule, then tying).

    transformers 5 marks modules, parameters and buffers `_is_hf_initialized` once drawn and then
    skips them, so a second `init_weights()` would be a no-op: the marks are cleared first.
    """
    for part in (*module.modules(), *module.parameters(), *module.buffers()):
        if getattr(part, "_is_hf_initialized", False):
            part._is_hf_initialized = False
    module.init_weights()


def _reset_torch(module: torch.nn.Module) -> None:
    """`reset_parameters()` on every submodule that has one (how torch's layers draw their init)."""
    for submodule in module.modules():
        reset = getattr(submodule, "reset_parameters", None)
        if callable(reset):
            reset()


def _logits(output: Any) -> torch.Tensor:
    """The logits of a forward's result: a tensor, an output object's `.logits`, or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the module returned {type(output).__name__}; expected logits [B, S, V], an output "
                    f"with `.logits`, or a tuple whose first element is the logits")


RESIDUAL_AXES = ("batch", "seq", "embed")  # as the project's models name their residual stream


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _replace_first(value, tensor):
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:]))


def mark_residual_stream(layers) -> None:
    """Name the residual stream around each layer in `layers` (a model's decoder blocks), as the
    project's own models do in code: each layer's input hidden states are `constrain`ed to
    `("batch", "seq", "embed")` and named `layer_input` (activation checkpointing keeps it), and its
    output hidden states are constrained again. Identity outside `jit`; no parallelism is written
    here, a strategy's `logical` rules (`seq: tp`, Megatron SP) decide what the names mean."""
    def before(_, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            x = checkpoint_name(constrain(args[0], RESIDUAL_AXES), LAYER_INPUT)
            return (x, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            x = checkpoint_name(constrain(kwargs["hidden_states"], RESIDUAL_AXES), LAYER_INPUT)
            return args, {**kwargs, "hidden_states": x}
        return None

    def after(_, args, output):
        hidden = _first_tensor(output)
        return None if hidden is None else _replace_first(output, constrain(hidden, RESIDUAL_AXES))

    for layer in layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after)


def make_functional(module: torch.nn.Module, *, seq_len: int, vocab_size: int, name: str | None = None,
                    axes: Callable[[dict], dict] | None = None, call_kwargs: dict | None = None,
                    layers=None, dropout: bool = False) -> Model:
    """A `Model` whose `init`/`apply`/`loss` run `module` (tokens [B, S] int64 -> logits [B, S, V]).

    - `init(seed, dtype=torch.float32)`: `{name: tensor}` in `named_parameters()` order (a tied
      weight appears once, under its first name). The module's own init is re-run under a forked
      CPU RNG seeded by `seed` (a Hugging Face model's `init_weights`, else every `reset_parameters`),
      drawn in float32 and cast, as the project's models do, so a seed gives the same numbers in
      any process and dtype. The module is cast to `dtype` too, so its buffers match the params.
      Under `torch.device("meta")` or a `FakeTensorMode` the leaves are empty and the module untouched.
    - `apply(params, tokens)`: `functional_call(module, params, (tokens,), call_kwargs)`. Tied
      weights follow `params` (`tie_weights=True`), so a tied weight's gradient sums every use.
      Buffers (e.g. Llama's rotary `inv_freq`) stay the module's own and are read as constants.
      `call_kwargs` defaults to `{"use_cache": False}` for a Hugging Face model, else none.
    - `loss(params, batch)`: mean next-token cross-entropy, as `gpt.loss`.

    Dropout is off by default (the module in `eval()` mode), so every strategy computes exactly its
    single-process reference. `dropout=True` runs `loss` in `train()` mode (its dropout masks drawn
    from torch's generator, per block of a split value: `sharding.random_ops`; equal to the
    reference only in distribution) and `eval_loss` in `eval()` mode for validation.
    `axes`: `params -> {name: tuple of logical axes}` for the strategies (e.g. `hf.tp_plan_axes`).
    `layers`: the module's decoder blocks, whose residual stream is then named
    (`mark_residual_stream`), so sequence parallelism and `remat=full` apply to it.
    """
    module.eval()
    if layers is not None:
        mark_residual_stream(layers)
    hf = is_hf_model(module)
    if call_kwargs is None:
        call_kwargs = {"use_cache": False} if hf else {}
    cfg = ModuleConfig(name=name or type(module).__name__, seq_len=seq_len, vocab_size=vocab_size)

    def init(seed: int, dtype: torch.dtype = torch.float32) -> dict:
        if is_abstract():  # shapes only: the planner's meta / fake trees
            return {key: torch.empty(p.shape, dtype=dtype) for key, p in module.named_parameters()}
        module.to(torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                (_reset_hf if hf else _reset_torch)(module)
        module.to(dtype)
        return {key: p.detach().clone() for key, p in module.named_parameters()}

    def apply(params: dict, tokens: torch.Tensor) -> torch.Tensor:
        return _logits(torch.func.functional_call(module, params, (tokens,), call_kwargs))  # [B, S, V]

    def eval_loss(params: dict, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy; batch = {"inputs": [B, S], "targets": [B, S]} int64."""
        logits = apply(params, batch["inputs"])
        vocab = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, vocab), batch["targets"].reshape(-1))

    def loss(params: dict, batch: dict) -> torch.Tensor:
        """`eval_loss`, with the module's dropout on when `dropout=True` (the module stays in eval())."""
        if not dropout:
            return eval_loss(params, batch)
        module.train()
        try:
            return eval_loss(params, batch)
        finally:
            module.eval()

    return Model(cfg=cfg, init=init, apply=apply, loss=loss, axes=axes, eval_loss=eval_loss if dropout else None)


__all__ = ["ModuleConfig", "RESIDUAL_AXES", "is_hf_model", "make_functional", "mark_residual_stream"]
