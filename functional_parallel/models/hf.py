"""Hugging Face causal LMs as `Model`s: built from a config dict (nothing downloaded), axes from a TP plan.

A tensor-parallel plan maps module paths (`*` stands for one whole path component, as in
transformers' own plans) to a style. `tp_plan_axes` reads each style as the logical axes of that
module's parameters, so the strategies' `param_axes` (`heads: tp`, `mlp: tp`, ...) split HF weights
exactly as they split the project's own models (Megatron's layout):

    colwise                out features are T:      Linear weight [out, in] (T, "embed"), bias (T,)
    rowwise                in features are T:       Linear weight [out, in] ("embed", T), bias ("embed",)
    packed_colwise:<n>     colwise, n blocks of T side by side (a fused q|k|v): T becomes (T, n)
    embedding_rowwise      an Embedding [vocab, embed]: ("vocab", "embed")
    colwise_gather_output  the lm_head Linear [vocab, embed]: ("vocab", "embed")

T is "heads" inside attention (a path component containing "attn" or "attention"; "kv_heads" for
`k_proj` / `v_proj`, Llama's grouped kv heads), else "mlp". GPT-2's `Conv1D` stores [in, out], so its
two dims swap. Parameters outside the plan are unnamed (None per dim) except norms over the hidden
size ("embed",) and embeddings ("vocab" or "positions", "embed").

A model's own plan (`model.tp_plan`, e.g. Llama's) is used when none is given. GPT-2 ships none, so
give one; `packed_colwise:<n>` is our extension for its fused `c_attn`:
`{"transformer.h.*.attn.c_attn": "packed_colwise:3", "transformer.h.*.attn.c_proj": "rowwise",
"transformer.h.*.mlp.c_fc": "colwise", "transformer.h.*.mlp.c_proj": "rowwise"}`.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from . import Model
from .module import make_functional

STYLES = ("colwise", "rowwise", "packed_colwise:<n>", "embedding_rowwise", "colwise_gather_output")


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError('Hugging Face models need transformers: pip install -e ".[dev]"') from error
    return transformers


def causal_lm(hf: dict, *, vocab_size: int, seq_len: int) -> torch.nn.Module:
    """A randomly initialised `AutoModelForCausalLM` from a transformers config dict (`model_type` and its fields).

    `vocab_size` is set from the data and the position table made at least `seq_len` long.
    """
    transformers = _transformers()
    fields = dict(hf)
    if "model_type" not in fields:
        raise ValueError(f"the hf config needs a model_type (e.g. 'gpt2', 'llama'); got the fields {sorted(fields)}")
    config = transformers.AutoConfig.for_model(**fields)
    config.vocab_size = vocab_size
    # GPT-2 names its position length n_positions (max_position_embeddings is an alias for it).
    positions = "n_positions" if hasattr(config, "n_positions") else "max_position_embeddings"
    if hasattr(config, positions):
        setattr(config, positions, max(getattr(config, positions) or 0, seq_len))
    for token_field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # a default id past a small vocabulary (GPT-2's 50256) only makes transformers warn: drop it
        token = getattr(config, token_field, None)
        if token_field not in fields and isinstance(token, int) and token >= vocab_size:
            setattr(config, token_field, None)
    return transformers.AutoModelForCausalLM.from_config(config)


def build(hf: dict, *, vocab_size: int, seq_len: int, tp_plan: dict | None = None, name: str | None = None,
          dropout: bool = False) -> Model:
    """`causal_lm(hf, ...)` as a `Model`, its axes read from `tp_plan` or, when None, the model's own plan."""
    module = causal_lm(hf, vocab_size=vocab_size, seq_len=seq_len)
    return make_functional(module, seq_len=seq_len, vocab_size=vocab_size, name=name or hf["model_type"],
                           axes=tp_plan_axes(module, tp_plan), layers=decoder_layers(module), dropout=dropout)


def decoder_layers(module: torch.nn.Module):
    """The decoder blocks of a transformers causal LM: the `ModuleList` its base model keeps as
    `layers` (Llama, Mistral, Qwen, GPT-NeoX) or `h` (GPT-2, GPT-J, Falcon, Bloom); None if neither."""
    base = getattr(module, "base_model", module)
    for name in ("layers", "h"):
        found = getattr(base, name, None)
        if isinstance(found, torch.nn.ModuleList):
            return found
    return None


def _key_pattern(key: str) -> re.Pattern:
    """A plan key as a regex over module paths: `*` matches one whole path component."""
    return re.compile(r"\.".join(r"[^.]+" if part == "*" else re.escape(part) for part in key.split(".")))


def _is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D`: a linear layer whose weight is [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _sharded_axis(path: str) -> str:
    """The logical axis a TP style splits for the module at `path`."""
    parts = path.split(".")
    if any("attn" in part or "attention" in part for part in parts):
        return "kv_heads" if parts[-1].endswith(("k_proj", "v_proj")) else "heads"
    return "mlp"


def _linear_axes(module: torch.nn.Module, path: str, style: str, split) -> dict:
    """{param name: axes} of a colwise / rowwise linear layer (`split`: T, or (T, n) when packed)."""
    if not (isinstance(module, torch.nn.Linear) or _is_conv1d(module)):
        raise ValueError(f"tp plan style {style!r} at {path!r} needs a Linear or Conv1D, got {type(module).__name__}")
    colwise = not style.startswith("rowwise")
    out_in = (split, "embed") if colwise else ("embed", split)
    axes = {"weight": out_in[::-1] if _is_conv1d(module) else out_in, "bias": (split,) if colwise else ("embed",)}
    return {key: value for key, value in axes.items() if getattr(module, key, None) is not None}


def _planned_axes(module: torch.nn.Module, path: str, style: str) -> dict:
    """{param name (local to `module`): logical axes} for one planned module."""
    if style in ("colwise", "rowwise"):
        return _linear_axes(module, path, style, _sharded_axis(path))
    blocks = style.split(":", 1)[1] if style.startswith("packed_colwise:") else ""
    if blocks.isdigit() and int(blocks) > 0:
        return _linear_axes(module, path, style, (_sharded_axis(path), int(blocks)))
    if style == "embedding_rowwise" and isinstance(module, torch.nn.Embedding):
        return {"weight": ("vocab", "embed")}
    if style == "colwise_gather_output" and isinstance(module, torch.nn.Linear):
        return {"weight": ("vocab", "embed"), **({"bias": ("vocab",)} if module.bias is not None else {})}
    raise ValueError(f"tp plan style {style!r} at {path!r} ({type(module).__name__}) is not supported; "
                     f"supported styles: {', '.join(STYLES)}")


def _default_axes(module: torch.nn.Module, param: torch.Tensor, hidden: int | None, vocab: int | None) -> tuple:
    """A parameter outside the plan: embeddings and hidden-size norms are named, the rest left None."""
    if isinstance(module, torch.nn.Embedding) and param.dim() == 2:
        return ("vocab" if param.shape[0] == vocab else "positions", "embed")
    if param.dim() == 1 and "norm" in type(module).__name__.lower() and param.shape[0] == hidden:
        return ("embed",)
    return (None,) * param.dim()


def tp_plan_axes(module: torch.nn.Module, plan: dict | None = None) -> Callable[[dict], dict]:
    """`params -> {name: logical axes}` from `plan` (module path -> TP style) or the model's own plan.

    The axes are read once from the module; parameters the module does not know get None per dim.
    A plan key that matches no module, or a style this reader does not know, is a ValueError.
    """
    if plan is None:
        plan = getattr(module, "tp_plan", None) or getattr(module, "_tp_plan", None) or {}
    config = getattr(module, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    vocab = getattr(config, "vocab_size", None)
    patterns = [(key, _key_pattern(key), style) for key, style in plan.items()]
    matched: set[str] = set()
    by_name: dict[str, tuple] = {}
    seen: set[int] = set()  # a tied weight is named once, under the name `named_parameters` gives it
    for path, submodule in module.named_modules():
        styles = [(key, style) for key, pattern, style in patterns if pattern.fullmatch(path)]
        matched.update(key for key, _ in styles)
        planned = _planned_axes(submodule, path, styles[0][1]) if styles else {}
        for local, param in submodule.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            by_name[f"{path}.{local}" if path else local] = planned.get(local) or _default_axes(
                submodule, param, hidden, vocab)
    unmatched = [key for key in plan if key not in matched]
    if unmatched:
        examples = [path for path, _ in module.named_modules() if path][:3]
        raise ValueError(f"tp plan keys {unmatched} match no module of {type(module).__name__} "
                         f"(its module paths look like {examples}; `*` stands for one whole component)")

    def axes(params: dict) -> dict:
        return {name: by_name.get(name, (None,) * param.dim()) for name, param in params.items()}

    return axes


__all__ = ["STYLES", "build", "causal_lm", "decoder_layers", "tp_plan_axes"]
