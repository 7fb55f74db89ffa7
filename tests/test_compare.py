"""`experiments.compare`: runs (a strategy, maybe with a policy) are parsed and checked step by step
against a reference under the same policy, and a tiny comparison writes its report with policy rows."""
from __future__ import annotations

import pathlib

import pytest
from hydra import compose, initialize_config_dir

from experiments import compare, report

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")
PLAIN = ["dp", "zero1", "zero2", "zero3", "tp", "tp_sp", "fsdp_tp"]


def compose_compare(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="compare", overrides=overrides)


def test_default_compares_every_strategy_in_float64_plus_policy_runs():
    cfg = compose_compare([])
    runs = compare.parse_runs(cfg)
    assert [run.name for run in runs] == PLAIN + ["zero3_bf16", "tp_sp_bf16", "dp_accum2", "zero3_remat", "zero3_offload"]
    assert cfg.model.dtype == "float64" and cfg.model.size == "tiny"
    for run in runs:
        train_cfg = compare.train_config(cfg, run)
        assert train_cfg.strategy.name == run.strategy and train_cfg.log_every == 1
        compare.validate(train_cfg)
    configs = {run.name: compare.train_config(cfg, run) for run in runs}
    assert configs["zero3_bf16"].precision == "bf16" and configs["dp_accum2"].grad_accum == 2
    assert configs["zero3"].precision == "fp32" and configs["zero3"].grad_accum == 1
    assert configs["zero3_remat"].remat == "full" and configs["zero3_offload"].offload == "optimizer"
    # one reference per distinct policy: fp32, bf16, fp32 with two micro-batches (remat and offload
    # change where values live, not what they are: they share the fp32 reference)
    assert len({compare.reference_policy(c) for c in configs.values()}) == 3
    assert compare.tolerance(cfg, configs["zero3"]) == 1e-9
    assert compare.tolerance(cfg, configs["zero3_bf16"]) == compare.TOLERANCES["bfloat16"]
    assert compare.policy_keys(runs) == ["precision", "grad_accum", "remat", "offload"]


def test_strategies_shorthand_replaces_runs():
    runs = compare.parse_runs(compose_compare(["strategies=[dp,zero3]"]))
    assert runs == [compare.Run("dp", "dp"), compare.Run("zero3", "zero3")]
    runs = compare.parse_runs(compose_compare(["runs=[dp,{name: dp_fp16, strategy: dp, precision: fp16}]"]))
    assert runs[1] == compare.Run("dp_fp16", "dp", {"precision": "fp16"})


def test_bad_runs_fail_before_anything_runs():
    with pytest.raises(ValueError, match="unknown strategy 'zero4' in run 'zero4'.*zero3"):
        compare.compare(compose_compare(["strategies=[dp,zero4]"]), "/nonexistent")
    with pytest.raises(ValueError, match="run 'x'.*not a valid train-config override"):
        compare.compare(compose_compare(["runs=[{name: x, strategy: dp, precison: bf16}]"]), "/nonexistent")
    with pytest.raises(ValueError, match="run 'x' overrides \\['steps'\\]"):
        compare.parse_runs(compose_compare(["runs=[{name: x, strategy: dp, steps: 3}]"]))
    with pytest.raises(ValueError, match="repeated: \\['dp'\\]"):
        compare.parse_runs(compose_compare(["runs=[dp,dp]"]))
    with pytest.raises(ValueError, match="unknown precision 'bf8'"):
        compare.compare(compose_compare(["runs=[{name: x, strategy: dp, precision: bf8}]"]), "/nonexistent")


def test_divergence_names_the_run_and_the_step():
    reference = [4.0, 3.5, 3.0]
    assert compare.check_equivalent("dp", [4.0, 3.5 * (1 + 1e-12), 3.0], reference, 1e-9) < 1e-9
    with pytest.raises(compare.NotEquivalentError, match=r"run 'zero3' .* same policy at step 2"):
        compare.check_equivalent("zero3", [4.0, 3.6, 3.0], reference, 1e-9)
    with pytest.raises(compare.NotEquivalentError, match="at step 3"):
        compare.check_equivalent("tp", [4.0, 3.5, float("nan")], reference, 1e-9)
    # the bf16 tolerance admits a few roundings of a bf16 loss, not a curve that drifted by 5%
    bf16 = compare.TOLERANCES["bfloat16"]
    assert compare.check_equivalent("zero3_bf16", [4.0, 3.5 + 2 ** -6, 3.0], reference, bf16) < bf16
    with pytest.raises(compare.NotEquivalentError, match=r"run 'zero3_bf16' .* at step 2"):
        compare.check_equivalent("zero3_bf16", [4.0, 3.5 * 1.05, 3.0], reference, bf16)


@pytest.mark.slow
def test_policy_runs_are_equivalent_and_reported(tmp_path):
    cfg = compose_compare(["runs=[dp,zero3,{name: zero3_bf16, strategy: zero3, precision: bf16},"
                           "{name: dp_accum2, strategy: dp, grad_accum: 2}]",
                           "+meshes.dp={dp: 2}", "+meshes.zero3={dp: 2}", "steps=4"])
    outcome = compare.compare(cfg, tmp_path)
    results, references = outcome["results"], outcome["references"]
    assert list(results) == ["dp", "zero3", "zero3_bf16", "dp_accum2"]
    for name, summary in results.items():
        assert summary["max_rel_diff"] <= summary["rtol"]
        assert summary["losses"] == pytest.approx(references[name], rel=summary["rtol"])
        assert (tmp_path / name / "metrics.jsonl").exists()
    assert results["dp"]["rtol"] == 1e-9 and results["zero3_bf16"]["rtol"] == compare.TOLERANCES["bfloat16"]
    assert references["dp_accum2"] == pytest.approx(references["dp"], rel=1e-12)  # same math, own reference
    assert references["zero3_bf16"] != pytest.approx(references["zero3"], rel=1e-6)  # it casts: a bf16 curve

    text = (tmp_path / "report.md").read_text()
    for plot in report.PLOTS.values():
        assert (tmp_path / plot).stat().st_size > 1000 and f"({plot})" in text
    assert "| run | strategy | mesh | precision | grad_accum |" in text
    assert "| dp | dp | dp=2 | fp32 | 1 |" in text and "| zero3_bf16 | zero3 | dp=2 | bf16 | 1 |" in text
    assert "| dp_accum2 | dp | dp=2 | fp32 | 2 |" in text
    # zero3 splits parameters and state: less memory, more traffic than dp, and the prose says so
    assert "it splits parameters and gradients over dp, optimizer state over dp" in text
    zero3, dp, bf16 = (results[name]["ranks"][0] for name in ("zero3", "dp", "zero3_bf16"))
    assert zero3["peak_bytes_measured"] < dp["peak_bytes_measured"]
    # bf16 over float64 masters: gradients reduce-scattered in 2 bytes instead of 8, and a smaller peak;
    # zero3's float64 loss rides in its gradient bucket (8 B in each of the 2 ranks' blocks), the bf16
    # run's float32 loss does not join bf16 gradients
    kinds = {name: results[name]["cost"]["bytes_by_kind"] for name in results}
    assert kinds["zero3_bf16"]["reduce_scatter"] * 4 + 2 * 8 == kinds["zero3"]["reduce_scatter"]
    assert bf16["peak_bytes_measured"] < zero3["peak_bytes_measured"]
    assert "**zero3_bf16** (zero3 + precision=bf16) against zero3: peak memory -" in text
    # two micro-batches, still one gradient all-reduce: the same bytes up to the scalar loss reductions
    assert abs(kinds["dp_accum2"]["all_reduce"] - kinds["dp"]["all_reduce"]) <= 64
    assert "**dp_accum2** (dp + grad_accum=2) against dp:" in text

    # A reference under another policy fails loudly, naming the run and the first step: the exact dp run
    # against the bf16 reference; the bf16 run against its reference with step 3 moved by 5%.
    summaries = {name: dict(results[name]) for name in ("dp", "zero3_bf16")}
    configs = {run.name: compare.train_config(cfg, run) for run in compare.parse_runs(cfg) if run.name in summaries}
    mutated = list(references["zero3_bf16"])
    mutated[2] *= 1.05
    failures = compare.check_runs(cfg, summaries, {"dp": references["zero3_bf16"], "zero3_bf16": mutated}, configs)
    assert len(failures) == 2 and "run 'dp' diverges" in failures[0] and "at step 1" in failures[0]
    assert "run 'zero3_bf16' diverges" in failures[1] and "at step 3" in failures[1]
    assert summaries["dp"]["max_rel_diff"] is None and summaries["zero3_bf16"]["max_rel_diff"] is None


def test_docs_block_lists_the_default_runs():
    """docs/compare.md's block is written by `python -m experiments.compare write_readme=true`: one row per
    default run, and a policy line for each policy run."""
    from experiments import docs

    block = docs.read_block(compare.DOC_BLOCK)
    runs = compare.parse_runs(compose_compare([]))
    rows = [line.split(" | ")[0].lstrip("| ") for line in block.splitlines() if line.startswith("| ")][1:]
    assert rows == [run.name for run in runs]
    for run in runs:
        assert (f"**{run.name}** ({run.describe().replace(', ', ' + ', 1)}) against {run.strategy}" in block) \
            == bool(run.overrides)


@pytest.mark.slow
def test_compare_checks_a_hugging_face_llama_against_its_reference(tmp_path):
    """`experiments.compare model=hf_llama`: an HF module, split by the project's own strategy files
    through its TP plan, follows the single-process curve to 1e-9 (float64)."""
    cfg = compose_compare(["model=hf_llama", "model.hf.num_hidden_layers=1", "strategies=[zero3,fsdp_tp]",
                           "steps=3"])
    results = compare.compare(cfg, tmp_path)["results"]
    assert set(results) == {"zero3", "fsdp_tp"}
    assert all(summary["max_rel_diff"] < 1e-9 for summary in results.values())
    tp = {c["kind"] for c in results["fsdp_tp"]["collectives"] if c["axes"] == "tp"}
    assert tp == {"all_reduce"}, tp  # Megatron's layout from the TP plan: no tp gather of weights


def test_the_loss_plot_draws_each_runs_relative_difference(tmp_path):
    """Twelve curves on top of each other say little; their differences from the reference are drawn too."""
    summary = {"losses": [4.0, 3.5, 3.0], "reference_losses": [4.0, 3.5 * (1 + 1e-12), 3.0 * (1 + 2e-10)],
               "reference_policy": {"precision": "fp32"}, "rtol": 1e-9}
    differences = report.relative_differences(summary)
    assert differences[0] == report.DIFFERENCE_FLOOR  # exactly equal: drawn at the floor of the log scale
    assert abs(differences[1] - 1e-12) < 1e-15 and abs(differences[2] - 2e-10) < 1e-13
    report.plot_losses({"dp": summary, "zero3": dict(summary, losses=[4.0, 3.5, 3.0])}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 10_000
