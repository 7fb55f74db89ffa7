"""The planner: extrapolation is exact, ZeRO Table 1 and Korthikanti's layer formula are reproduced,
and planning a 175B model allocates nothing. No processes: every lowering is on fake tensors."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import plan as plan_cli
from experiments.plan_report import markdown, markdown_table, zero_table
from functional_parallel import planner, published
from functional_parallel.models import build, config
from functional_parallel.parallel import Strategy

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")
# Published-size models lowered on fake tensors: tens of seconds each, so outside `-m "not slow"`.
pytestmark = pytest.mark.slow


def plan_config(overrides: list[str]) -> plan_cli.PlanConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="plan", overrides=overrides))


def test_config_composes_with_overrides():
    default = plan_config([])
    assert (default.model.size, default.mesh, default.precision) == ("gpt3_175b", "dp64_tp8", "bf16")
    cfg = plan_config(["model=llama2_70b", "mesh={dp: 32, tp: 8}", "strategies=[zero3,tp_sp]", "precision=fp32",
                       "depth=null"])
    assert (cfg.model.arch, cfg.model.size, cfg.mesh["dp"], cfg.strategies) == ("llama", "llama2_70b", 32,
                                                                                ["zero3", "tp_sp"])
    assert cfg.precision == "fp32" and cfg.depth is None


@pytest.mark.parametrize("arch,strategy", [("gpt", "fsdp_tp"),  # both axes: ZeRO-3 gathers on dp, TP on tp
                                           pytest.param("gpt", "tp_sp", marks=pytest.mark.slow),
                                           pytest.param("llama", "tp_sp", marks=pytest.mark.slow)])
def test_extrapolation_equals_full_lowering(arch, strategy):
    """Lowering 1 and 2 layers and extrapolating gives exactly what lowering 3 and 4 layers gives."""
    mesh = {"dp": 2, "tp": 2}
    base = config(arch, "tiny", seq_len=32, vocab_size=planner.mesh_padded_vocab(64, mesh))
    build_model = lambda n: build(arch, cfg=dataclasses.replace(base, n_layers=n))  # noqa: E731
    precision = planner.PRECISIONS["bf16"]
    extrapolated = planner.plan_strategy(build_model, 4, Strategy.load(strategy), mesh, 4, precision, depth=1)
    full = planner.plan_strategy(build_model, 4, Strategy.load(strategy), mesh, 4, precision, depth=None)
    assert full.lowered_depths == (3, 4) and extrapolated.lowered_depths == (1, 2)
    assert extrapolated.figures == full.figures
    assert extrapolated.per_layer == full.per_layer


@pytest.fixture(scope="module")
def zero_model_plan():
    """The ZeRO Table 1 model (GPT-3 6.7B layers at 35 layers, Ψ = 7.47B) on dp=64 × tp=8."""
    return plan_cli.plan(plan_config(["model=gpt_7_5b"]))  # every default strategy: docs/plan.md's block


def test_reproduces_zero_table_1(zero_model_plan):
    rows = {row["strategy"]: row for row in zero_model_plan["strategies"]}
    psi = rows["dp"]["figures"]["parameters"]
    assert abs(psi / 7.5e9 - 1) < 0.01
    for name, stage in published.ZERO_STAGES.items():
        figures = rows[name]["figures"]
        ours = figures["params"] + figures["grads"] + figures["optimizer"]
        at_our_psi = published.zero_model_state_bytes(stage, psi, 64)
        assert abs(ours - at_our_psi) <= 64, (name, ours, at_our_psi)  # only the int64 step counters differ
        paper = published.ZERO_TABLE_1["gb"][name] * 1e9
        assert abs(ours / paper - 1) < 0.02, (name, ours / 1e9, paper / 1e9)
    assert rows["zero1"]["figures"]["grads"] == 2 * psi  # ZeRO-1 keeps whole gradients, ZeRO-2 a 1/64 shard
    assert rows["zero2"]["figures"]["grads"] == 2 * psi // 64


def test_zero_communication_volume(zero_model_plan):
    """DP all-reduces 2Ψ; ZeRO-1/2 reduce-scatter Ψ and all-gather Ψ (2-byte elements)."""
    rows = {row["strategy"]: row["figures"] for row in zero_model_plan["strategies"]}
    psi = rows["dp"]["parameters"]
    for name in ("dp", "zero1", "zero2"):
        assert abs(rows[name]["comm/dp/volume"] - published.zero_comm_bytes(0, psi)) < 1e3, name


def test_korthikanti_layer_formula(zero_model_plan):
    """Per-layer activation bytes of a GPT-3 layer (s=2048, h=4096, a=32, b=1, bf16) equal Korthikanti's
    formula plus exactly the documented differences (no dropout, flash SDPA, norm statistics, SP gathers)."""
    s, h, a, b = 2048, 4096, 32, 1
    checked = set()
    for row in zero_model_plan["strategies"]:
        t, sp = row["t"], row["sp"]
        ours = row["per_layer"]["activations"]
        assert ours == published.our_layer_bytes(s, b, h, a, t, sp), row["strategy"]
        # The same, term by term: norm inputs + stats, norm outputs (whole under SP: the gathered copies),
        # q, k, v, attention output, MLP in/out; fp32 logsumexp; 2-byte mean and rstd of two norms.
        t_sp = t if sp else 1
        assert ours == (4 * s * b * h // t_sp + 4 * s * b * h + 24 * s * b * h // t
                        + 4 * a * s * b // t + 8 * s * b // t_sp), row["strategy"]
        checked.add((t, sp))
    assert checked == {(1, False), (8, False), (8, True)}  # no TP; Megatron TP; TP + SP
    # Without TP, flash attention's saving dominates: ours is well below the formula.
    dp = next(row for row in zero_model_plan["strategies"] if row["strategy"] == "dp")
    assert dp["per_layer"]["activations"] < 0.3 * published.korthikanti_layer_bytes(s, b, h, a)


def test_report_renders(zero_model_plan):
    text = markdown(zero_model_plan)
    assert "ZeRO Table 1" in text and "Korthikanti" in text and "| zero3 |" in text
    json.dumps(zero_model_plan, default=str)


def test_docs_plan_block_is_what_the_planner_prints(zero_model_plan):
    """docs/plan.md's ZeRO block is the planner's tables now (`python -m experiments.plan
    model=gpt_7_5b write_readme=true`); the 175B block's zero3 row: test_plans_175b_without_allocating."""
    from experiments import docs

    assert docs.read_block(plan_cli.doc_block("gpt_7_5b")) == markdown(zero_model_plan).strip()
    assert markdown_table(zero_table(zero_model_plan)) in markdown(zero_model_plan)


def _rss_bytes() -> int:
    import resource

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_plans_175b_without_allocating():
    """GPT-3 175B (fp32 parameters alone would be 700 GB) is planned on fake tensors: RSS barely moves."""
    before = _rss_bytes()
    result = plan_cli.plan(plan_config(["strategies=[zero3]"]))
    grown = _rss_bytes() - before
    row = result["strategies"][0]
    assert 174e9 < row["figures"]["parameters"] < 176e9
    assert row["figures"]["params"] == 2 * row["figures"]["parameters"] // 64
    assert grown < 1e9, f"RSS grew by {grown / 1e9:.2f} GB"
    # docs/plan.md's 175B block is rendered from results whose zero3 row is this one (tests/test_docs.py)
    saved = json.loads(plan_cli.results_file("gpt3_175b", pathlib.Path(CONF_DIR).parent).read_text())
    assert next(r for r in saved["strategies"] if r["strategy"] == "zero3")["figures"] == row["figures"], \
        "docs/plan.md's GPT-3 175B block is stale: rerun `python -m experiments.plan write_readme=true`"


def test_tiny_model_every_strategy():
    cfg = plan_config(["model=gpt_tiny", "mesh=dp2_tp2", "precision=fp32",
                       "strategies=[zero1,tp,fsdp_tp]"])
    result = plan_cli.plan(cfg)
    assert [row["strategy"] for row in result["strategies"]] == ["zero1", "tp", "fsdp_tp"]
    for row in result["strategies"]:
        assert row["figures"]["activations"] > 0 and row["figures"]["params"] > 0
    assert "| fsdp_tp |" in markdown(result)


@pytest.fixture(scope="module")
def recompute_plans():
    """GPT-3 175B, bf16, dp=64 × tp=8: TP+SP under selective recompute, TP+SP and Megatron TP under full."""
    return {"selective": plan_cli.plan(plan_config(["remat=selective", "strategies=[tp_sp]"])),
            "full": plan_cli.plan(plan_config(["remat=full", "strategies=[tp_sp,tp]"]))}


def test_selective_recompute_175b_matches_korthikanti(recompute_plans):
    """Selective recompute, TP+SP: Korthikanti's 34sbh/t per layer, plus exactly the documented
    differences (no dropout masks, the flash logsumexp, norm statistics). The SP-gathered norm outputs
    are not kept: under recompute their shard is kept and gathered again in backward, as Megatron does."""
    s, h, a, b, t = 2048, 12288, 96, 1, 8
    rows = {row["strategy"]: row for row in recompute_plans["selective"]["strategies"]}
    tp_sp = rows["tp_sp"]
    assert tp_sp["korthikanti_layer_bytes"] == 34 * s * b * h / t
    ours = tp_sp["per_layer"]["activations"]
    assert ours == published.our_layer_bytes(s, b, h, a, t, True, remat="selective")
    assert ours - 34 * s * b * h // t == -2 * s * b * h // t + 4 * a * s * b // t + 8 * s * b // t
    assert "selective recompute" in markdown(recompute_plans["selective"])


def test_full_recompute_175b_keeps_the_layer_input(recompute_plans):
    """Full recompute keeps one layer input per layer: 2sbh/t under SP (sequence-split), 2sbh under TP."""
    s, h, b, t = 2048, 12288, 1, 8
    rows = {row["strategy"]: row for row in recompute_plans["full"]["strategies"]}
    assert rows["tp_sp"]["per_layer"]["activations"] == 2 * s * b * h // t == rows["tp_sp"]["korthikanti_layer_bytes"]
    assert rows["tp"]["per_layer"]["activations"] == 2 * s * b * h == rows["tp"]["korthikanti_layer_bytes"]
    assert all(not row["layer_differences"] for row in rows.values())


def test_bad_remat_fails_before_lowering():
    with pytest.raises(ValueError, match=r"remat must be one of \['none', 'full', 'selective'\]"):
        plan_cli.plan(plan_config(["remat=some"]))


@pytest.mark.parametrize("strategy,mesh,t,sp", [("dp", {"dp": 2}, 1, False), ("tp", {"dp": 1, "tp": 2}, 2, False),
                                               ("tp_sp", {"dp": 1, "tp": 2}, 2, True)])
def test_math_attention_rows_follow_the_formula(strategy, mesh, t, sp):
    """With the scores written out (GPTConfig(attention="math")) no recompute keeps the softmax output
    (2as²b/t of Korthikanti's 5as²b/t) and selective recompute drops it: both rows equal the formula
    plus the documented differences (a small GPT, global batch 2, bf16). Under TP the scores are
    split by heads as the formula assumes (`sharding.batched_matmul` keeps the head dim apart)."""
    base = config("gpt", "tiny", seq_len=32, attention="math", vocab_size=planner.mesh_padded_vocab(64, mesh))
    build_model = lambda n: build("gpt", cfg=dataclasses.replace(base, n_layers=n))  # noqa: E731
    s, b, h, a = 32, 2 // mesh["dp"], base.d_model, base.n_heads
    per_layer = {}
    for remat in ("none", "selective"):
        result = planner.plan_strategy(build_model, 2, Strategy.load(strategy), mesh, 2, planner.PRECISIONS["bf16"],
                                       remat=remat)
        per_layer[remat] = result.per_layer["activations"]
        assert per_layer[remat] == published.our_layer_bytes(s, b, h, a, t, sp, 2, remat, "math"), remat
    # the bf16 softmax output; under SP selective recompute also re-gathers the norm outputs instead of keeping them
    regathered = sum(v for what, v in published.layer_differences(s, b, h, a, t, sp, 2, "none", "math")
                     if what.startswith("SP:"))
    assert per_layer["none"] - per_layer["selective"] == 2 * a * s * s * b // t + regathered


def test_long_sequence_traffic_per_layer_is_megatron_4Nh_and_ulysses_4Nh_over_P():
    """Llama-2 7B at 32K on 8 ranks (docs/long_sequences.md): one layer's forward activation traffic
    on the sequence axis, read off the lowered graph, equals Megatron SP's 4Nh and Ulysses' 4Nh/P."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="plan_long_sequence",
                                          overrides=["strategies=[tp_sp, ulysses]"]))
    result = plan_cli.plan(cfg)
    n_tokens, h, p = 32768, 4096, 8
    expected = {"tp_sp": 4 * n_tokens * h * 2, "ulysses": 4 * n_tokens * h // p * 2}  # bf16
    for row in result["strategies"]:
        sequence = row["sequence"]
        moved = sum(row["per_layer"].get(f"comm/{axis}/{kind}/forward/bytes", 0)
                    for axis in sequence["axes"] for kind in sequence["kinds"])
        assert moved == sequence["formula_bytes"] == expected[row["strategy"]], row["strategy"]
    assert "4Nh/P" in markdown(result)
