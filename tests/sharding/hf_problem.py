"""Hugging Face models the project did not write, as a user brings them: tiny configs, random init,
float64, made pure with `torch.func.functional_call` and differentiated with `grad_and_value`.

Specs are path rules over HF's own parameter names (colwise / rowwise as in HF's tensor-parallel
plans); nothing in the models is changed.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from sharding import Mesh, P, chunked, jit, shard, unshard

VOCAB, SEQ, BATCH = 64, 16, 8
STRATEGY_MESHES = {"dp": {"dp": 4, "tp": 1}, "zero3": {"dp": 4, "tp": 1}, "tp": {"dp": 2, "tp": 2},
                   "tp_sp": {"dp": 2, "tp": 2}, "fsdp_tp": {"dp": 2, "tp": 2}}
# Megatron's layout in HF's names: column-parallel weights split their output features over tp,
# row-parallel ones their input features. GPT-2's Conv1D stores weights [in, out], Linear [out, in].
COLWISE = {"gpt2": (r"attn\.c_attn\.weight$|mlp\.c_fc\.weight$", r"attn\.c_attn\.bias$|mlp\.c_fc\.bias$"),
           "llama": (r"(q|k|v|gate|up)_proj\.weight$", None)}
ROWWISE = {"gpt2": r"attn\.c_proj\.weight$|mlp\.c_proj\.weight$", "llama": r"(o|down)_proj\.weight$"}


def build(arch: str, attention: str):
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         attn_implementation=attention)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=SEQ, attn_implementation=attention)
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.float64).eval()


def make_problem(arch: str, attention: str):
    """The model, its parameters (tied weights appear once), a batch, and the step (loss, grads)."""
    model = build(arch, attention)
    params = {name: p.detach() for name, p in model.named_parameters()}
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def loss(params, batch):
        logits = torch.func.functional_call(model, params, (batch["input_ids"],), {"use_cache": False}).logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))

    grad_and_value = torch.func.grad_and_value(loss)

    def step(params, batch):
        grads, value = grad_and_value(params, batch)
        return value, grads

    return model, params, batch, step


def param_specs(arch: str, strategy: str, params) -> dict:
    weight, bias = COLWISE[arch]
    colwise_dim = 1 if arch == "gpt2" else 0
    specs = {}
    for name, p in params.items():
        tp_dim = None
        if strategy in ("tp", "tp_sp", "fsdp_tp"):
            if re.search(weight, name):
                tp_dim = colwise_dim
            elif bias and re.search(bias, name):
                tp_dim = 0
            elif re.search(ROWWISE[arch], name):
                tp_dim = 1 - colwise_dim
        entries = [None] * p.dim()
        if tp_dim is not None:
            # GPT-2's c_attn is q, k and v side by side: each tp rank takes its part of every one.
            entries[tp_dim] = chunked("tp", 3) if "c_attn" in name else "tp"
        free = next((d for d in range(p.dim()) if entries[d] is None), None)
        if strategy in ("zero3", "fsdp_tp") and free is not None:
            entries[free] = "dp"  # ZeRO-3 over dp on a dim tp leaves whole (a tp-split bias stays on tp)
        specs[name] = P(*entries)
    return specs


def reference(arch: str, attention: str) -> dict:
    _, params, batch, step = make_problem(arch, attention)
    loss, grads = step(params, batch)
    return {"loss": loss, "grads": grads}


def run_strategy(arch: str, attention: str, strategy: str) -> dict:
    """On each rank: lower and run the step under `strategy`; the loss, global grads and collectives."""
    _, params, batch, step = make_problem(arch, attention)
    mesh = Mesh(STRATEGY_MESHES[strategy])
    specs = param_specs(arch, strategy, params)
    compiled = jit(step, mesh=mesh, in_specs=(specs, P("dp")), out_specs=(P(), specs),
                   logical_rules={"batch": "dp", **({"seq": "tp"} if strategy == "tp_sp" else {})})
    local = (shard(params, specs, mesh), shard(batch, P("dp"), mesh))
    lowered = compiled.lower(*local)
    loss, grads = lowered.run(*local)
    return {"loss": loss, "grads": unshard(grads, specs, mesh), "collectives": lowered.collectives}
