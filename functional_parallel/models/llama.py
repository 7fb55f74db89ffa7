"""Llama-style decoder as pure functions: RMSNorm, RoPE, SwiGLU, optional grouped-query attention.

Same conventions as `gpt.py`: a plain nested dict/list of tensors, weights `[in, out]` used
as `x @ w`, the residual stream named with logical axes via `constrain`, and `cfg` passed to
`apply`/`loss` for what shapes cannot tell (head counts, eps, RoPE base).
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
KV_TOKEN_MAJOR = ("batch", "attention_seq", "kv_heads", None)
KV_HEAD_MAJOR = ("batch", "kv_heads", "attention_seq", None)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a Llama. `n_kv_heads=None` means n_heads (no GQA); `d_ff=None` uses Llama's rule."""

    vocab_size: int = 64
    seq_len: int = 16
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Llama's SwiGLU width: 2/3 of 4*d_model, rounded up to a multiple of 32."""
        if self.d_ff is not None:
            return self.d_ff
        return 32 * math.ceil(int(2 * 4 * self.d_model / 3) / 32)

    @classmethod
    def named(cls, size: str, **overrides) -> "LlamaConfig":
        """A named size (`tiny`, `small`, `llama2_7b`, `llama2_70b`) with optional field overrides."""
        if size not in SIZES:
            raise ValueError(f"unknown Llama size {size!r}; expected one of {sorted(SIZES)}")
        return dataclasses.replace(SIZES[size], **overrides)

    def __post_init__(self):
        if self.d_model % self.n_heads or self.n_heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(
                f"need d_model ({self.d_model}) divisible by n_heads ({self.n_heads}), n_heads divisible "
                f"by n_kv_heads ({self.kv_heads}) and an even head_dim ({self.d_model / self.n_heads})")


SIZES: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    "small": LlamaConfig(vocab_size=128, seq_len=64, d_model=128, n_layers=3, n_heads=4, d_ff=352),
    "llama2_7b": LlamaConfig(vocab_size=32000, seq_len=4096, d_model=4096, n_layers=32, n_heads=32, d_ff=11008),
    "llama2_70b": LlamaConfig(vocab_size=32000, seq_len=4096, d_model=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8, d_ff=28672),
}


def init(cfg: LlamaConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """Parameters drawn N(0, init_std); output projections scaled by 1/sqrt(2 n_layers); norms one."""
    make = ParamFactory(seed, dtype)
    d, f, kv_dim, std = cfg.d_model, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim, cfg.init_std
    residual_std = std / math.sqrt(2 * cfg.n_layers)
    params: dict = {"tok": make.normal((cfg.vocab_size, d), std), "blocks": []}
    for _ in range(cfg.n_layers):
        params["blocks"].append({
            "attn_norm": {"w": make.ones((d,))},
            "attn": {
                "wq": make.normal((d, d), std), "wk": make.normal((d, kv_dim), std),
                "wv": make.normal((d, kv_dim), std), "wo": make.normal((d, d), residual_std),
            },
            "mlp_norm": {"w": make.ones((d,))},
            "mlp": {
                "w_gate": make.normal((d, f), std), "w_up": make.normal((d, f), std),
                "w_down": make.normal((f, d), residual_std),
            },
        })
    params["norm"] = {"w": make.ones((d,))}
    params["head"] = make.normal((d, cfg.vocab_size), std)
    return params


# The logical axes of every parameter, by leaf name (strategies map them to mesh axes).
PARAM_AXES = {"tok": ("vocab", "embed"), "w": ("embed",), "wq": ("embed", "heads"), "wk": ("embed", "kv_heads"),
              "wv": ("embed", "kv_heads"), "wo": ("heads", "embed"), "w_gate": ("embed", "mlp"),
              "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"), "head": ("embed", "vocab")}


def axes(params: dict) -> dict:
    """The logical axes of every parameter (k/v columns are the grouped kv heads)."""
    return by_leaf_name(params, PARAM_AXES)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * w, computed in float32 so bf16 activations keep their precision."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32; float64 stays float64
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (half-split convention); x [B, H, S, hd].

    Angles come from `arange` positions with tensor ops only, so the function traces to a
    fixed graph for any sequence length.
    """
    seq, head_dim = x.shape[-2], x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=x.device, dtype=torch.float32) / half))
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [S, hd/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _head_major(x: torch.Tensor, token_major: tuple, head_major: tuple) -> torch.Tensor:
    """[B, S, H, hd] -> [B, H, S, hd], constrained on both sides (Ulysses' all-to-all, both ways; on
    mesh axes the strategy does not map these names, x keeps its layout)."""
    return constrain(constrain(x, token_major, other_axes="keep").transpose(1, 2), head_major, other_axes="keep")


def _attention(p: dict, x: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Causal grouped-query self-attention; x [B, S, D] -> [B, S, D]."""
    batch, seq, d_model = x.shape
    n_heads, n_kv, head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    q = _head_major((x @ p["wq"]).view(batch, seq, n_heads, head_dim), TOKEN_MAJOR, HEAD_MAJOR)  # [B, H, S, hd]
    k = _head_major((x @ p["wk"]).view(batch, seq, n_kv, head_dim), KV_TOKEN_MAJOR, KV_HEAD_MAJOR)  # [B, Hkv, S, hd]
    v = _head_major((x @ p["wv"]).view(batch, seq, n_kv, head_dim), KV_TOKEN_MAJOR, KV_HEAD_MAJOR)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    if n_kv != n_heads:  # GQA: each k/v head serves n_heads // n_kv query heads
        repeat = n_heads // n_kv
        k = k[:, :, None].expand(batch, n_kv, repeat, seq, head_dim).reshape(batch, n_heads, seq, head_dim)
        v = v[:, :, None].expand(batch, n_kv, repeat, seq, head_dim).reshape(batch, n_heads, seq, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = constrain(out, HEAD_MAJOR, other_axes="keep").transpose(1, 2)  # [B, S, H, hd]
    out = constrain(out, TOKEN_MAJOR, other_axes="keep").reshape(batch, seq, d_model)  # [B, S, D]
    return out @ p["wo"]


def _mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: (silu(x W_gate) * x W_up) W_down; hidden [B, S, F]."""
    return (F.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def apply(params: dict, tokens: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Logits [B, S, V] for int64 tokens [B, S]."""
    eps = cfg.norm_eps
    x = constrain(params["tok"][tokens], RESIDUAL_AXES)  # [B, S, D]
    for block in params["blocks"]:
        x = checkpoint_name(x, LAYER_INPUT)
        x = x + _attention(block["attn"], _rms_norm(x, block["attn_norm"]["w"], eps), cfg)
        x = constrain(x, RESIDUAL_AXES)
        x = x + _mlp(block["mlp"], _rms_norm(x, block["mlp_norm"]["w"], eps))
        x = constrain(x, RESIDUAL_AXES)
    return _rms_norm(x, params["norm"]["w"], eps) @ params["head"]  # [B, S, V]


def loss(params: dict, batch: dict, cfg: LlamaConfig) -> torch.Tensor:
    """Mean next-token cross-entropy; batch = {"inputs": [B, S], "targets": [B, S]} int64."""
    logits = apply(params, batch["inputs"], cfg)
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, vocab), batch["targets"].reshape(-1))
