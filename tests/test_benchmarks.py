"""The benchmark's pieces (`python -m benchmarks.strategies` itself runs on demand, not here).

Torch's module wrapper must compute exactly our GPT; one small multi-rank run checks the measured
traffic (that docs/benchmark.md's table is the newest results file's: tests/test_docs.py).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import report
from benchmarks.torch_model import GPTModule
from functional_parallel.models import build


def test_torch_module_computes_our_gpt(random_tokens):
    model = build("gpt", "tiny")
    params = model.init(0, dtype=torch.float64)
    module = GPTModule(params, model.cfg)
    tokens = random_tokens(4, model.cfg.seq_len + 1, model.cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    assert torch.equal(module.logits(batch["inputs"]), model.apply(params, batch["inputs"]))
    assert torch.equal(module(batch), model.loss(params, batch))
    names = {name for name, _ in module.named_parameters()}
    assert len(names) == len(torch.utils._pytree.tree_leaves(params))


@pytest.mark.slow
def test_small_benchmark_run_measures_what_the_compiler_plans():
    """4 ranks, a smaller GPT, one timed step: traffic counted at run time equals the plan, DDP
    all-reduces and FSDP2 reduce-scatters the parameter bytes once, every loss equals DDP's."""
    from benchmarks.strategies import BenchmarkConfig, run

    cfg = BenchmarkConfig(contenders=["dp", "zero3", "ddp", "fsdp2"], d_model=32, seq_len=16, vocab_size=64,
                          warmup_steps=1, rounds=1, steps_per_round=1, write=False, write_readme=False)
    results = run(cfg)
    contenders = results["contenders"]
    param_bytes = 4 * sum(p.numel() for p in torch.utils._pytree.tree_leaves(
        build("gpt", "tiny", d_model=32, seq_len=16, vocab_size=64).init(0)))
    for name in ("dp", "zero3"):
        assert contenders[name]["measured_bytes_by_kind"] == contenders[name]["planned"]["bytes_by_kind"], name
    assert contenders["ddp"]["measured_bytes_by_kind"] == {"all_reduce": param_bytes}
    assert contenders["fsdp2"]["measured_bytes_by_kind"]["reduce_scatter"] == param_bytes
    for name, entry in contenders.items():
        assert entry["loss_max_rel_diff_vs_ddp"] < 1e-5, name
        assert entry["step_ms_median"] > 0 and entry["peak_bytes"] > 0
    assert "**met**" in report.table(results) or "**missed**" in report.table(results)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="the GPU path needs 4 GPUs (one per rank, NCCL)")
def test_small_benchmark_run_on_gpus():
    from benchmarks.strategies import BenchmarkConfig, run

    cfg = BenchmarkConfig(contenders=["dp", "zero3", "ddp", "fsdp2"], d_model=32, seq_len=16, vocab_size=64,
                          warmup_steps=1, rounds=1, steps_per_round=1, device="cuda", write=False, write_readme=False)
    results = run(cfg)
    assert results["machine"]["backend"] == "nccl"
    for name, entry in results["contenders"].items():
        assert entry["loss_max_rel_diff_vs_ddp"] < 1e-4, name
