"""Hugging Face GPT-2 and Llama (tiny, float64, sdpa and eager attention) through `functional_call`,
`grad_and_value` and `sharding.jit`: every strategy on 4 gloo ranks equals the single-process run."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from functional_parallel.launch import spawn  # noqa: E402

from . import hf_problem  # noqa: E402
from .equivalence import assert_equals_reference  # noqa: E402

MODELS = [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")]
TOLERANCE = 1e-9


def _every_model_and_strategy(rank, world):
    return {(arch, attention, name): hf_problem.run_strategy(arch, attention, name)
            for arch, attention in MODELS for name in hf_problem.STRATEGY_MESHES}


@pytest.fixture(scope="module")
def per_rank():
    """One spawn for every model and strategy: the processes start (and import transformers) once."""
    return spawn(_every_model_and_strategy, 4, timeout_s=600)


@pytest.fixture(params=MODELS, ids=["-".join(m) for m in MODELS])
def outcome(request, per_rank):
    arch, attention = request.param
    results = [{name: got[(arch, attention, name)] for name in hf_problem.STRATEGY_MESHES} for got in per_rank]
    return arch, attention, hf_problem.reference(arch, attention), results


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(hf_problem.STRATEGY_MESHES))
def test_hf_model_equals_reference(outcome, strategy):
    arch, attention, ref, per_rank = outcome
    assert_equals_reference([(r[strategy]["loss"], r[strategy]["grads"]) for r in per_rank], ref["loss"],
                            ref["grads"], TOLERANCE, f"{arch}/{attention}/{strategy}")


@pytest.mark.slow
def test_hf_tp_sp_splits_the_residual_stream_as_megatron_sp(outcome):
    """With the decoder blocks' residual stream named (`mark_residual_stream`, as `hf.build` does),
    tp_sp is sequence parallel: each all-reduce of tp becomes an all-gather before the column matmuls
    and a reduce-scatter after the row ones. GPT-2's Conv1D is one `addmm` over the flattened tokens
    [b*s, d]: its Partial is reduce-scattered into each sequence's piece there (the hint passes back
    through the view that unflattens it), so it too moves no activation all-reduce. The head and the
    per-token loss run on the sequence-split stream (the flattened tokens keep each sequence's
    piece, a chunked split), so the final norm's output is never gathered: 4 gathers per layer."""
    arch, _, _, per_rank = outcome
    tp = [(c["kind"], tuple(c["shape"] or ())) for c in per_rank[0]["tp_sp"]["collectives"] if c["axes"] == ("tp",)]
    residual, flat = (8, 16, 32), (8 * 16, 32)  # [b, s, d] and [b*s, d] (records give global shapes)
    assert tp.count(("all_gather", residual)) == 8, tp
    assert tp.count(("reduce_scatter", residual)) + tp.count(("reduce_scatter", flat)) == 8, tp
    assert not [c for c in tp if c[0] == "all_reduce" and c[1] in (residual, flat)], tp


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["tp", "fsdp_tp"])
def test_hf_tp_moves_activations_not_weights(outcome, strategy):
    """Tensor parallelism gathers nothing over tp, neither a weight nor an attention activation:
    GPT-2 (its fused c_attn split with `chunked("tp", 3)`) and Llama, with sdpa or eager attention
    (whose [b, h, s, d] matmuls keep the head split: `sharding.batched_matmul`), do two all-reduces
    per layer forward and two backward, as Megatron."""
    arch, attention, _, per_rank = outcome
    tp = [c for c in per_rank[0][strategy]["collectives"] if c["axes"] == ("tp",)]
    assert [c["kind"] for c in tp] == ["all_reduce"] * 8, [(c["kind"], c["shape"], c["source"]) for c in tp]
