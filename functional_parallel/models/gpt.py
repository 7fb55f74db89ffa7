"""GPT-2 style decoder as pure functions: `init(cfg, seed) -> params`, `apply(params, tokens)`.

Params are a plain nested dict/list of tensors; weights are stored `[in, out]` and used as
`x @ w`, so a leaf path such as `blocks/0/attn/wq` names exactly one matmul operand. The
residual stream is named with logical axes via `constrain` so a strategy can shard it, and each
block's input is named `layer_input` (`checkpoint_name`) for activation checkpointing; no other
parallelism lives here.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from sharding import checkpoint_name, constrain
from sharding.checkpoint_name import LAYER_INPUT

from ._axes import by_leaf_name
from ._init_utils import ParamFactory

RESIDUAL_AXES = ("batch", "seq", "embed")
# Attention's two layouts, as constraints at each side of its transposes (forward and gradient):
# token-major [B, S, H, hd] and head-major [B, H, S, hd]. Ulysses maps attention_seq and heads to
# one axis (a mesh axis goes to the first dim naming it), so the transposes are all-to-alls;
# ring attention maps only attention_seq, Megatron TP only heads: for them both are no-ops.
TOKEN_MAJOR = ("batch", "attention_seq", "heads", None)
HEAD_MAJOR = ("batch", "heads", "attention_seq", None)
ATTENTION = ("sdpa", "math")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of a GPT. `d_mlp` defaults to 4 * d_model.

    `attention`: "sdpa" (`F.scaled_dot_product_attention`, which keeps no s² tensors on CPU) or
    "math" (softmax(QKᵀ/√d + causal mask)·V written out, the s² scores materialised, as in
    Korthikanti et al.'s accounting); the same function either way. Under tensor parallelism both
    split the attention core by heads (the math path's [B, H, S, S] matmuls keep their batch dims:
    `sharding.batched_matmul`).
    """

    vocab_size: int = 64
    seq_len: int = 16
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int | None = None
    fused_qkv: bool = False
    ln_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "sdpa"

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def named(cls, size: str, **overrides) -> "GPTConfig":
        """A named size (`tiny`, `small`, `gpt2_124m`, `gpt3_175b`) with optional field overrides."""
        if size not in SIZES:
            raise ValueError(f"unknown GPT size {size!r}; expected one of {sorted(SIZES)}")
        return dataclasses.replace(SIZES[size], **overrides)

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {list(ATTENTION)}, got {self.attention!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


SIZES: dict[str, GPTConfig] = {
    # Tests: every dim divisible by 4 so 4-way sharding works.
    "tiny": GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4),
    # Demo: trains char-level text in under two minutes on two CPU cores.
    "small": GPTConfig(vocab_size=128, seq_len=64, d_model=128, n_layers=3, n_heads=4),
    # Published sizes: only ever built on meta/fake tensors by the planner.
    "gpt2_124m": GPTConfig(vocab_size=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12),
    "gpt3_175b": GPTConfig(vocab_size=50257, seq_len=2048, d_model=12288, n_layers=96, n_heads=96),
    # BLOOM-176B's dims (BigScience 2022); ALiBi and the embedding LayerNorm are not modelled: learned
    # positions instead (docs/pipelines.md lists the difference).
    "bloom_176b": GPTConfig(vocab_size=250880, seq_len=2048, d_model=14336, n_layers=70, n_heads=112),
}


def init(cfg: GPTConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """Parameters drawn N(0, init_std) (residual projections scaled by 1/sqrt(2 n_layers), as GPT-2)."""
    make = ParamFactory(seed, dtype)
    d, f, std = cfg.d_model, cfg.mlp_dim, cfg.init_std
    residual_std = std / math.sqrt(2 * cfg.n_layers)
    params: dict = {
        "wte": make.normal((cfg.vocab_size, d), std),
        "wpe": make.normal((cfg.seq_len, d), std),
        "blocks": [],
    }
    for _ in range(cfg.n_layers):
        q, k, v = (make.normal((d, d), std) for _ in range(3))
        # fused or not, the same draws: a fused model equals its separate twin for a seed
        attn = {"wqkv": torch.cat([q, k, v], dim=1)} if cfg.fused_qkv else {"wq": q, "wk": k, "wv": v}
        attn["wo"] = make.normal((d, d), residual_std)
        params["blocks"].append({
            "ln1": {"w": make.ones((d,)), "b": make.zeros((d,))},
            "attn": attn,
            "ln2": {"w": make.ones((d,)), "b": make.zeros((d,))},
            "mlp": {
                "w_in": make.normal((d, f), std), "b_in": make.zeros((f,)),
                "w_out": make.normal((f, d), residual_std), "b_out": make.zeros((d,)),
            },
        })
    params["ln_f"] = {"w": make.ones((d,)), "b": make.zeros((d,))}
    params["head"] = make.normal((d, cfg.vocab_size), std)
    return params


# The logical axes of every parameter, by leaf name (strategies map them to mesh axes).
PARAM_AXES = {"wte": ("vocab", "embed"), "wpe": ("positions", "embed"), "w": ("embed",), "b": ("embed",),
              "wq": ("embed", "heads"), "wk": ("embed", "heads"), "wv": ("embed", "heads"),
              "wqkv": ("embed", ("heads", 3)), "wo": ("heads", "embed"), "w_in": ("embed", "mlp"), "b_in": ("mlp",),
              "w_out": ("mlp", "embed"), "b_out": ("embed",), "head": ("embed", "vocab")}


def axes(params: dict) -> dict:
    """The logical axes of every parameter (q/k/v columns are heads; a fused q|k|v is 3 head blocks)."""
    return by_leaf_name(params, PARAM_AXES)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d + causal mask)·V with the [B, H, S, S] scores materialised."""
    seq = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, S, S]
    # An additive mask (-inf above the diagonal): its gradient reads nothing, so no mask is saved.
    positions = torch.arange(seq, device=q.device)
    future = positions[None, :] > positions[:, None]  # [S, S]: key after query
    causal = torch.zeros(seq, seq, dtype=scores.dtype, device=q.device).masked_fill(future, float("-inf"))
    return torch.softmax(scores + causal, dim=-1) @ v  # [B, H, S, hd]


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, hd] -> [B, H, S, hd], constrained on both sides (Ulysses' all-to-all, both ways; on
    mesh axes the strategy does not map these names, x keeps its layout)."""
    return constrain(constrain(x, TOKEN_MAJOR, other_axes="keep").transpose(1, 2), HEAD_MAJOR, other_axes="keep")


def _attention(p: dict, x: torch.Tensor, n_heads: int, attention: str = "sdpa") -> torch.Tensor:
    """Causal multi-head self-attention; x [B, S, D] -> [B, S, D]."""
    batch, seq, d_model = x.shape
    head_dim = d_model // n_heads
    if "wqkv" in p:
        q, k, v = (x @ p["wqkv"]).split(d_model, dim=-1)
    else:
        q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    # [B, S, D] -> [B, H, S, hd]
    q, k, v = (_head_major(t.view(batch, seq, n_heads, head_dim)) for t in (q, k, v))
    if attention == "math":
        out = _math_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = constrain(out, HEAD_MAJOR, other_axes="keep").transpose(1, 2)  # [B, S, H, hd]
    out = constrain(out, TOKEN_MAJOR, other_axes="keep").reshape(batch, seq, d_model)  # [B, S, D]
    return out @ p["wo"]


def _layer_norm(x: torch.Tensor, p: dict, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p["w"], p["b"], eps)


def _mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(x @ p["w_in"] + p["b_in"], approximate="tanh")  # [B, S, F]
    return hidden @ p["w_out"] + p["b_out"]


def apply(params: dict, tokens: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """Logits [B, S, V] for int64 tokens [B, S] (S <= cfg.seq_len).

    `cfg` supplies what shapes cannot (head count, eps); bind it with `functools.partial`
    or use `functional_parallel.models.build` to get `apply(params, tokens)`.
    """
    seq = tokens.shape[1]
    n_heads, eps = cfg.n_heads, cfg.ln_eps
    positions = torch.arange(seq, device=tokens.device)
    x = params["wte"][tokens] + params["wpe"][positions]  # [B, S, D]
    x = constrain(x, RESIDUAL_AXES)
    for block in params["blocks"]:
        x = checkpoint_name(x, LAYER_INPUT)
        x = x + _attention(block["attn"], _layer_norm(x, block["ln1"], eps), n_heads, cfg.attention)
        x = constrain(x, RESIDUAL_AXES)
        x = x + _mlp(block["mlp"], _layer_norm(x, block["ln2"], eps))
        x = constrain(x, RESIDUAL_AXES)
    return _layer_norm(x, params["ln_f"], eps) @ params["head"]  # [B, S, V]


def loss(params: dict, batch: dict, cfg: GPTConfig) -> torch.Tensor:
    """Mean next-token cross-entropy; batch = {"inputs": [B, S], "targets": [B, S]} int64."""
    logits = apply(params, batch["inputs"], cfg)
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, vocab), batch["targets"].reshape(-1))

