"""The benchmark's pieces (`python -m benchmarks.strategies` itself runs on demand, not here).

Torch's module wrappers (DDP/FSDP2's and TP's) must compute our GPT; small multi-rank runs check the
measured traffic and torch TP's losses (that docs/benchmark.md's table is the newest results file's: tests/test_docs.py).
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


def test_linear_module_computes_our_gpt(random_tokens):
    """torch TP's module (nn.Linear weights = our weights transposed) is our GPT's math."""
    from benchmarks.torch_tp import LinearGPT

    model = build("gpt", "tiny")
    params = model.init(0, dtype=torch.float64)
    tokens = random_tokens(4, model.cfg.seq_len + 1, model.cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    module = LinearGPT(params, model.cfg).to(torch.float64)
    torch.testing.assert_close(module(batch), model.loss(params, batch), rtol=1e-12, atol=0)


@pytest.mark.slow
def test_torch_tensor_parallel_contenders_train_the_same_model():
    """torch's own TP and TP+SP (`parallelize_module`, Megatron's plan) on the dp=2 x tp=2 mesh of our
    tp strategy: every step's loss equals DDP's; TP all-reduces over tp, TP+SP gathers and scatters."""
    from benchmarks.strategies import BenchmarkConfig, run

    cfg = BenchmarkConfig(contenders=["tp_sp", "ddp", "torch_tp", "torch_tp_sp"], d_model=32, seq_len=16,
                          vocab_size=64, warmup_steps=1, rounds=1, steps_per_round=1, write=False, write_readme=False)
    results = run(cfg)
    contenders = results["contenders"]
    for name in ("torch_tp", "torch_tp_sp"):
        assert contenders[name]["mesh"] == {"dp": 2, "tp": 2}
        assert contenders[name]["loss_max_rel_diff_vs_ddp"] < 1e-5, name
    assert set(contenders["torch_tp"]["measured_bytes_by_kind"]) == {"all_reduce"}
    assert contenders["torch_tp_sp"]["measured_bytes_by_kind"]["reduce_scatter"] > 0
    assert "| torch TP+SP | dp=2 × tp=2 |" in report.table(results)
    assert [(c["ours"], c["torch"]) for c in results["targets"]] == [("tp_sp", "torch_tp_sp")]


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
    _check_timelines(results)


def _check_timelines(results):
    """Ours record one step's collectives per rank: every planned collective once, each issued
    before its wait starts and done before the step ends; a figure is drawn from them."""
    import tempfile
    from pathlib import Path

    from benchmarks import timeline

    for name in ("dp", "zero3"):
        entry = results["contenders"][name]
        assert len(entry["timeline"]) == results["config"]["world_size"]
        for found in entry["timeline"]:
            collectives = found["collectives"]
            assert len(collectives) == entry["planned"]["num_collectives"]
            assert sum(c["bytes"] for c in collectives) == sum(entry["planned"]["bytes_by_kind"].values())
            assert all(found["start"] <= c["issue"] <= c["wait"] <= c["ready"] <= found["end"] for c in collectives)
    assert "timeline" not in results["contenders"]["ddp"]
    with tempfile.TemporaryDirectory() as tmp:
        path = timeline.plot(results, Path(tmp) / "timeline.png")
        assert path.stat().st_size > 10_000
    assert timeline.shown(results) == ["dp", "zero3"]


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


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_at_a_tiny_size():
    """`python -m benchmarks.gpu` at a tiny size without a GPU (eager): ours and torch's bf16 steps
    with fp32 masters are the same math (equal first loss, close after), MFU from the given peak."""
    from benchmarks.gpu import GPUBenchConfig, flops_per_token, run, table

    cfg = GPUBenchConfig(d_model=64, n_layers=2, n_heads=4, seq_len=32, vocab_size=128, batch=2, warmup_steps=1,
                         steps=2, compile=False, device="cpu", peak_tflops=1.0, write=False)
    results = run(cfg)
    contenders = results["contenders"]
    assert set(contenders) == {"ours_compiled", "torch_eager", "torch_compiled"}
    ours, torch_eager = contenders["ours_compiled"]["losses"], contenders["torch_eager"]["losses"]
    assert ours[0] == torch_eager[0] and abs(ours[-1] - torch_eager[-1]) / torch_eager[-1] < 2e-2
    for entry in contenders.values():
        assert entry["mfu"] == pytest.approx(entry["tokens_per_s"] * flops_per_token(results["parameters"], cfg) / 1e12)
    assert "| torch_eager | no |" in table(results)


def test_lowering_benchmark_runs_at_a_tiny_size():
    """`python -m benchmarks.lowering`'s measurement and table, on the tiny GPT (no processes)."""
    from benchmarks import lowering

    results = lowering.run(lowering.LoweringBenchConfig(strategies=["zero3", "tp_sp"], layers=[1, 2], size="tiny",
                                                        vocab_size=64, write=False))
    rows = {(row["strategy"], row["layers"]): row for row in results["rows"]}
    assert set(rows) == {("zero3", 1), ("zero3", 2), ("tp_sp", 1), ("tp_sp", 2)}
    assert all(rows[s, 2]["nodes"] > rows[s, 1]["nodes"] and rows[s, 2]["stages"]["trace_s"] > 0 for s in ("zero3",
                                                                                                         "tp_sp"))
    assert "| zero3 | 2 |" in lowering.table(results)


def test_comm_timeline_spans_and_hidden_share_from_records():
    """`sharding.comm_timeline` alone: records become per-collective spans, and the hidden share is
    the in-flight time the rank did not spend waiting (two 4 s flights, 1 s waited: 7/8)."""
    from sharding import comm_timeline

    meta = [{"stream": "all_reduce over dp", "kind": "all_reduce", "bytes": 4, "phase": "forward"},
            {"stream": "all_gather over dp", "kind": "all_gather", "bytes": 8, "phase": "forward"}]
    records = [("step_start", 0.0), ("collective_issue", 1, 1.0), ("collective_issue", 0, 2.0),
               ("collective_wait", 1, 4.0, 5.0), ("collective_wait", 0, 6.0, 6.0), ("step_end", 7.0)]
    found = comm_timeline.spans(records, meta)
    assert (found["start"], found["end"]) == (0.0, 7.0)
    assert [(c["stream"], c["issue"], c["wait"], c["ready"]) for c in found["collectives"]] == [
        ("all_gather over dp", 1.0, 4.0, 5.0), ("all_reduce over dp", 2.0, 6.0, 6.0)]
    assert comm_timeline.hidden_fraction(found) == pytest.approx(1 - 1.0 / (4.0 + 4.0))
