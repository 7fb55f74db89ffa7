"""`experiments.compare`: equivalence is checked step by step, and a tiny comparison writes its report."""
from __future__ import annotations

import pathlib

import pytest
from hydra import compose, initialize_config_dir

from experiments import compare, report

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")


def compose_compare(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="compare", overrides=overrides)


def test_default_compares_every_strategy_in_float64():
    cfg = compose_compare([])
    assert list(cfg.strategies) == ["dp", "zero1", "zero2", "zero3", "tp", "tp_sp", "fsdp_tp"]
    assert cfg.model.dtype == "float64" and cfg.model.size == "tiny"
    for name in cfg.strategies:
        train_cfg = compare.train_config(cfg, name)
        assert train_cfg.strategy.name == name and train_cfg.log_every == 1
        compare.validate(train_cfg)


def test_unknown_strategy_fails_with_the_known_ones():
    cfg = compose_compare(["strategies=[dp,zero4]"])
    with pytest.raises(ValueError, match="unknown strategy 'zero4'.*zero3"):
        compare.compare(cfg, "/nonexistent")


def test_divergence_names_the_strategy_and_the_step():
    reference = [4.0, 3.5, 3.0]
    assert compare.check_equivalent("dp", [4.0, 3.5 * (1 + 1e-12), 3.0], reference, 1e-9) < 1e-9
    with pytest.raises(compare.NotEquivalentError, match=r"strategy 'zero3' .* at step 2"):
        compare.check_equivalent("zero3", [4.0, 3.6, 3.0], reference, 1e-9)
    with pytest.raises(compare.NotEquivalentError, match="at step 3"):
        compare.check_equivalent("tp", [4.0, 3.5, float("nan")], reference, 1e-9)


@pytest.mark.slow
def test_two_strategies_are_equivalent_and_reported(tmp_path):
    cfg = compose_compare(["strategies=[dp,zero3]", "meshes.dp={dp: 2, tp: 1}", "meshes.zero3={dp: 2, tp: 1}",
                           "steps=4"])
    outcome = compare.compare(cfg, tmp_path)
    results, reference = outcome["results"], outcome["reference"]
    assert list(results) == ["dp", "zero3"] and len(reference) == 4
    for name, summary in results.items():
        assert summary["max_rel_diff"] <= compare.TOLERANCES["float64"]
        assert summary["losses"] == pytest.approx(reference, rel=1e-9)
        assert (tmp_path / name / "metrics.jsonl").exists()
    text = (tmp_path / "report.md").read_text()
    for plot in report.PLOTS.values():
        assert (tmp_path / plot).stat().st_size > 1000 and f"({plot})" in text
    assert "| dp | dp=2 |" in text and "| zero3 | dp=2 |" in text
    # zero3 splits parameters and state: less memory, more traffic than dp, and the prose says so
    assert "**Memory:** zero3 is cheapest" in text and "**Traffic:** zero3 moves the most" in text
    assert "it splits parameters and gradients over dp, optimizer state over dp" in text
    zero3, dp = results["zero3"]["ranks"][0], results["dp"]["ranks"][0]
    assert zero3["peak_bytes_measured"] < dp["peak_bytes_measured"]
