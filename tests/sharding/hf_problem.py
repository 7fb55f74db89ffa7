"""Hugging Face models the project did not write, as a user brings them: tiny configs, random init,
float64, made pure with `torch.func.functional_call` and differentiated with `grad_and_value`.

Specs come from the project's strategy files (`param_axes`, `fsdp`) over the logical axes read from
each model's tensor-parallel plan (`functional_parallel.models.hf.tp_plan_axes`: colwise / rowwise);
nothing in the models is changed and no rule names an HF parameter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from functional_parallel import parallel
from functional_parallel.models.hf import decoder_layers, tp_plan_axes
from functional_parallel.models.module import mark_residual_stream
from functional_parallel.parallel import Strategy, example_mesh
from sharding import Mesh, P, jit, shard, unshard

VOCAB, SEQ, BATCH = 64, 16, 8
STRATEGY_MESHES = {name: example_mesh(name) for name in ("dp", "zero3", "tp", "tp_sp", "fsdp_tp")}
# GPT-2 ships no tensor-parallel plan (Llama's is its own, read from the model): Megatron's layout in
# HF's styles, its fused q|k|v `c_attn` as 3 packed blocks (each tp rank takes its part of every one).
GPT2_PLAN = {"transformer.h.*.attn.c_attn": "packed_colwise:3", "transformer.h.*.attn.c_proj": "rowwise",
             "transformer.h.*.mlp.c_fc": "colwise", "transformer.h.*.mlp.c_proj": "rowwise"}


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
    mark_residual_stream(decoder_layers(model))  # what `hf.build` does: the residual stream is named
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


def param_specs(arch: str, strategy: str, params, model) -> dict:
    """The project's strategy file applied to the model's TP plan read as logical axes: no rule names an HF leaf."""
    axes = tp_plan_axes(model, GPT2_PLAN if arch == "gpt2" else None)(params)
    return parallel.param_specs(Strategy.load(strategy), params, axes)


def reference(arch: str, attention: str) -> dict:
    _, params, batch, step = make_problem(arch, attention)
    loss, grads = step(params, batch)
    return {"loss": loss, "grads": grads}


def run_strategy(arch: str, attention: str, strategy: str) -> dict:
    """On each rank: lower and run the step under `strategy`; the loss, global grads and collectives."""
    model, params, batch, step = make_problem(arch, attention)
    mesh = Mesh(STRATEGY_MESHES[strategy])
    specs = param_specs(arch, strategy, params, model)
    compiled = jit(step, mesh=mesh, in_specs=(specs, P("dp")), out_specs=(P(), specs),
                   logical_rules={"batch": "dp", **({"seq": "tp"} if strategy == "tp_sp" else {})})
    local = (shard(params, specs, mesh), shard(batch, P("dp"), mesh))
    lowered = compiled.lower(*local)
    loss, grads = lowered.run(*local)
    return {"loss": loss, "grads": unshard(grads, specs, mesh), "collectives": lowered.collectives}
