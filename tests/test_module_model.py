"""`models.module.make_functional` and `models.hf`: an nn.Module as a pure `Model`, HF TP plans as axes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from functional_parallel.models.module import ModuleConfig, make_functional

VOCAB, SEQ, BATCH = 64, 16, 4
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
GPT2_PLAN = {"transformer.h.*.attn.c_attn": "packed_colwise:3", "transformer.h.*.attn.c_proj": "rowwise",
             "transformer.h.*.mlp.c_fc": "colwise", "transformer.h.*.mlp.c_proj": "rowwise"}


class TinyLM(torch.nn.Module):
    """Embedding + linear head: tokens [B, S] -> logits [B, S, V]."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def make_batch():
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}


def eager_grads(module, params, batch):
    """The module's own `.grad`s after `loss.backward()` from `params` (the reference for `torch.func.grad`)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])
    module.zero_grad()
    output = module(batch["inputs"])
    logits = output if isinstance(output, torch.Tensor) else output.logits
    F.cross_entropy(logits.reshape(-1, VOCAB), batch["targets"].reshape(-1)).backward()
    return {name: p.grad for name, p in module.named_parameters()}


def assert_grads_match(model, module, params):
    batch = make_batch()
    grads = torch.func.grad(model.loss)(params, batch)
    expected = eager_grads(module, params, batch)
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-12, msg=name)


def test_module_init_is_seeded_and_grads_match_eager():
    module = TinyLM()
    model = make_functional(module, seq_len=SEQ, vocab_size=VOCAB, name="tiny")
    assert model.cfg == ModuleConfig(name="tiny", seq_len=SEQ, vocab_size=VOCAB)
    first, again, other = model.init(0, torch.float64), model.init(0, torch.float64), model.init(1, torch.float64)
    assert list(first) == ["embed.weight", "head.weight", "head.bias"]
    assert all(first[k].dtype == torch.float64 and torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)
    assert model.apply(first, make_batch()["inputs"]).shape == (BATCH, SEQ, VOCAB)
    assert_grads_match(model, module, first)


def test_init_under_meta_leaves_the_module_alone():
    module = TinyLM()
    before = module.head.weight.detach().clone()
    with torch.device("meta"):
        params = make_functional(module, seq_len=SEQ, vocab_size=VOCAB).init(0, torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in params.values())
    assert torch.equal(module.head.weight, before)


def test_gpt2_tied_embedding_gets_both_gradients():
    pytest.importorskip("transformers")
    from functional_parallel.models import hf

    model = hf.build(GPT2, vocab_size=VOCAB, seq_len=SEQ, tp_plan=GPT2_PLAN)
    params = model.init(0, torch.float64)
    assert "lm_head.weight" not in params and "transformer.wte.weight" in params
    with torch.device("meta"):
        assert all(p.device.type == "meta" for p in model.init(0).values())
    # An eager twin (tied, as GPT-2 is): wte's .grad sums the embedding's and the lm_head's parts.
    twin = hf.causal_lm(GPT2, vocab_size=VOCAB, seq_len=SEQ).to(torch.float64).eval()
    assert twin.lm_head.weight is twin.transformer.wte.weight and twin.config.n_positions >= SEQ
    assert_grads_match(model, twin, params)


def test_hf_init_is_seeded_and_keeps_weights_tied():
    pytest.importorskip("transformers")
    from functional_parallel.models import hf

    module = hf.causal_lm(GPT2, vocab_size=VOCAB, seq_len=SEQ)
    model = make_functional(module, seq_len=SEQ, vocab_size=VOCAB)
    first, again, other = model.init(0, torch.float64), model.init(0, torch.float64), model.init(1, torch.float64)
    assert module.lm_head.weight is module.transformer.wte.weight
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.wte.weight"], other["transformer.wte.weight"])


def test_llama_plan_becomes_logical_axes():
    pytest.importorskip("transformers")
    from functional_parallel.models import hf

    model = hf.build(LLAMA, vocab_size=VOCAB, seq_len=SEQ)
    with torch.device("meta"):
        params = model.init(0)
    axes = model.axes(params)
    assert axes.keys() == params.keys()
    layer = "model.layers.0."
    assert axes[layer + "self_attn.q_proj.weight"] == ("heads", "embed")
    assert axes[layer + "self_attn.k_proj.weight"] == ("kv_heads", "embed")
    assert axes[layer + "self_attn.o_proj.weight"] == ("embed", "heads")
    assert axes[layer + "mlp.down_proj.weight"] == ("embed", "mlp")
    assert axes["model.embed_tokens.weight"] == ("vocab", "embed")
    assert axes[layer + "input_layernorm.weight"] == ("embed",)
    assert axes["lm_head.weight"] == ("vocab", "embed")


def test_gpt2_plan_becomes_logical_axes():
    pytest.importorskip("transformers")
    from functional_parallel.models import hf

    model = hf.build(GPT2, vocab_size=VOCAB, seq_len=SEQ, tp_plan=GPT2_PLAN)
    with torch.device("meta"):
        axes = model.axes(model.init(0))
    block = "transformer.h.1."
    assert axes[block + "attn.c_attn.weight"] == ("embed", ("heads", 3))  # Conv1D: [in, out]
    assert axes[block + "attn.c_attn.bias"] == (("heads", 3),)
    assert axes[block + "attn.c_proj.weight"] == ("heads", "embed")
    assert axes[block + "attn.c_proj.bias"] == ("embed",)
    assert axes[block + "mlp.c_fc.weight"] == ("embed", "mlp")
    assert axes["transformer.wte.weight"] == ("vocab", "embed")
    assert axes["transformer.wpe.weight"] == ("positions", "embed")
    assert axes["transformer.ln_f.bias"] == ("embed",)


def test_bad_plans_name_what_is_wrong():
    pytest.importorskip("transformers")
    from functional_parallel.models import hf

    gpt2 = hf.causal_lm(GPT2, vocab_size=VOCAB, seq_len=SEQ)
    with pytest.raises(ValueError, match=r"'sequence_parallel'.*transformer\.h\.0\.mlp\.c_fc.*colwise"):
        hf.tp_plan_axes(gpt2, {"transformer.h.*.mlp.c_fc": "sequence_parallel"})
    with pytest.raises(ValueError, match=r"transformer\.h\.\*\.mlp\.fc_in"):
        hf.tp_plan_axes(gpt2, {"transformer.h.*.mlp.fc_in": "colwise"})
    with pytest.raises(ValueError, match=r"transformer\.\*\.c_fc"):  # `*` is one whole component, not a prefix
        hf.tp_plan_axes(gpt2, {"transformer.*.c_fc": "colwise"})
