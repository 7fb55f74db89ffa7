"""The published formulas the planner is checked against, and the documented ways our step differs.

- ZeRO (Rajbhandari et al. 2020), Table 1: model-state bytes per rank for mixed-precision Adam,
  2Ψ params + 2Ψ grads + KΨ optimizer state (K = 12: fp32 master, m, v), over N_d ranks.
- Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
  section 4: activation bytes per transformer layer with 16-bit activations and 1-byte dropout
  masks, s = sequence, b = micro-batch, h = hidden, a = heads, t = tensor-parallel size; Table 2
  gives them without recompute, with selective recompute (section 4) and with full recompute.
"""
from __future__ import annotations

from sharding.remat import check_policy

# ZeRO Table 1: Ψ = 7.5B, N_d = 64, K = 12; GB = 1e9 bytes.
ZERO_TABLE_1 = {"psi": 7.5e9, "n_d": 64, "k": 12, "gb": {"dp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}}
# Which ZeRO stage (0 = the paper's baseline data parallelism) a strategy reproduces.
ZERO_STAGES = {"dp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


def zero_model_state_bytes(stage: int, psi: float, n_d: int, k: float = 12, param_bytes: float = 2,
                           grad_bytes: float = 2) -> float:
    """Bytes per rank of params, grads and optimizer state (KΨ) at ZeRO `stage` (0: plain DP).

    ZeRO's terms are 2Ψ + 2Ψ + KΨ; other precisions change the bytes per role (fp32 Adam: 4, 4, K = 8).
    """
    params, grads, states = param_bytes * psi, grad_bytes * psi, k * psi
    if stage == 0:
        return params + grads + states
    if stage == 1:
        return params + grads + states / n_d
    if stage == 2:
        return params + (grads + states) / n_d
    if stage == 3:
        return (params + grads + states) / n_d
    raise ValueError(f"ZeRO stage must be 0..3, got {stage}")


def zero_comm_bytes(stage: int, psi: float, bytes_per_element: int = 2) -> float:
    """ZeRO section 7: volume per rank and step; all-reduce = 2Ψ (DP, ZeRO-1/2), ZeRO-3 = 3Ψ."""
    return (3 if stage == 3 else 2) * psi * bytes_per_element


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            remat: str = "none") -> float:
    """Activation bytes per layer (their Table 2). No recompute: 34sbh + 5as²b; TP: sbh(10 + 24/t + 5as/(ht));
    TP+SP: (sbh/t)(34 + 5as/h). Selective recompute drops the 5as²b/t attention-core term; full recompute
    keeps only the layer input, 2sbh (2sbh/t under SP)."""
    check_policy(remat)
    t_sp = t if sp else 1
    if remat == "full":
        return 2 * s * b * h / t_sp
    attention_core = 0 if remat == "selective" else 5 * a * s * s * b / t
    if sp:
        return 34 * s * b * h / t + attention_core
    return s * b * h * (10 + 24 / t) + attention_core


# Each difference of our GPT layer from Korthikanti's, as (what, bytes per layer); `our_layer_bytes`
# is their sum with the formula, and the planner's lowered graph must equal it exactly.
def layer_differences(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                      act_bytes: int = 2, remat: str = "none", attention: str = "sdpa") -> list[tuple[str, float]]:
    """`attention`: GPTConfig's, "sdpa" (flash: no s² tensors, a logsumexp) or "math" (the softmax output kept)."""
    t_sp = t if sp else 1  # what the residual stream (and its norms) is split by
    if remat == "full":  # the layer input alone, as the formula
        return [] if act_bytes == 2 else [(f"{act_bytes}-byte activations instead of 2",
                                           2 * s * b * h / t_sp * (act_bytes / 2 - 1))]
    logsumexp = 4 * a * s * b / t if attention == "sdpa" else 0
    if attention == "math" and remat == "selective":
        core = ("attention written out (math): its softmax output is recomputed, as the formula assumes", 0)
    elif attention == "math":
        core = ("attention written out (math): only the softmax output is kept (2as²b/t); no scores (the "
                "scale's gradient reads nothing), no dropout: -3as²b/t", -3 * a * s * s * b / t)
    elif remat == "selective":
        core = ("SDPA (flash) keeps no a·s² tensors, so selective recompute finds none to drop; "
                "its fp32 logsumexp is kept: +4asb/t", logsumexp)
    else:
        core = ("SDPA (flash) keeps no a·s² scores, softmax or dropout: -5as²b/t, + fp32 logsumexp 4asb/t",
                -5 * a * s * s * b / t + logsumexp)
    out = [
        ("no dropout: the two 1-byte masks after attention and MLP", -2 * s * b * h / t_sp),
        core,
        (f"LayerNorm mean and rstd kept for backward ({act_bytes}-byte, 2 norms)", 4 * act_bytes * s * b / t_sp),
    ]
    if sp and remat == "none":  # with recompute, jit gathers them again in backward (schedule.regather)
        out.append(("SP: the all-gathered norm outputs feeding the column matmuls are kept for the weight "
                    "gradient (Megatron keeps the shard and re-gathers in backward; so do we under "
                    "remat=selective|full)", 4 * s * b * h * (1 - 1 / t)))
    if act_bytes != 2:
        base = korthikanti_layer_bytes(s, b, h, a, t, sp, remat) + sum(v for _, v in out)
        lse_and_stats = logsumexp + 4 * act_bytes * s * b / t_sp
        out.append((f"{act_bytes}-byte activations instead of 2", (base - lse_and_stats) * (act_bytes / 2 - 1)))
    return out


def our_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, act_bytes: int = 2,
                    remat: str = "none", attention: str = "sdpa") -> float:
    return korthikanti_layer_bytes(s, b, h, a, t, sp, remat) + sum(
        v for _, v in layer_differences(s, b, h, a, t, sp, act_bytes, remat, attention))


# Activation traffic per transformer layer and direction on the sequence axis (Jacobs et al. 2023,
# "DeepSpeed Ulysses", section 3.2): N tokens per data-parallel rank (b·s), hidden size h, P ranks.
# As the planner records it (a collective's per-rank buffer), Megatron SP's 2 all-gathers and
# 2 reduce-scatters of the full N×h stream are 4Nh; Ulysses' 4 all-to-alls of a rank's N/P tokens
# are 4Nh/P, with grouped-query k and v moving their kv heads only (h_kv = kv heads × head dim).
def megatron_sp_layer_bytes(n_tokens: int, h: int, dtype_bytes: int) -> int:
    return 4 * n_tokens * h * dtype_bytes


def ulysses_layer_bytes(n_tokens: int, h: int, h_kv: int, p: int, dtype_bytes: int) -> int:
    return (2 * h + 2 * h_kv) * n_tokens // p * dtype_bytes


def ring_layer_bytes(n_tokens: int, h_kv: int, p: int, dtype_bytes: int) -> int:
    """Ring attention's forward per layer: this rank's k and v blocks (N/P tokens each) passed on P-1 times."""
    return (p - 1) * 2 * n_tokens * h_kv // p * dtype_bytes


def sequence_scheme(rules: dict, weight_axes: set) -> str | None:
    """Which long-sequence scheme a strategy's constrain rules are: "megatron_sp" (the sequence on
    an axis that splits the weights' heads and features, `param_axes`), "ulysses" (the sequence and
    the heads on one axis that splits no weight that way; ZeRO over it is fine), "ring" (the
    sequence split inside attention too, the heads not on that axis), or None."""
    def axes(name):
        value = rules.get(name)
        return set((value,) if isinstance(value, str) else value or ())

    seq = axes("seq")
    if not seq:
        return None
    if seq & weight_axes:
        return "megatron_sp"
    if seq == axes("heads"):
        return "ulysses"
    return "ring" if seq == axes("attention_seq") else None
