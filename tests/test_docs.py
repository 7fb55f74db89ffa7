"""Every generated block in README.md and docs/ is one the project knows, lives in one file, names
the command that writes it, and is current: rendered from the results its command saved (compare,
plan, benchmark) or regenerated (the strategy table). The plan's saved figures are checked against
a fresh lowering in tests/test_plan.py."""
from __future__ import annotations

import json
import re

import pytest

from benchmarks import report as benchmark_report
from experiments import docs
from experiments import plan as plan_cli
from experiments import pipeline_report
from experiments import offload_report, report as compare_report
from experiments.plan_report import markdown


def test_every_generated_block_is_known_and_in_one_file():
    found = docs.blocks()
    assert set(found) == set(docs.GENERATED), "a block without a generator (or a generator without a block)"
    assert {name: len(paths) for name, paths in found.items()} == {name: 1 for name in found}


def test_every_generated_block_names_its_command():
    for name, paths in docs.blocks().items():
        text = paths[0].read_text()
        before = text[:text.index(docs.markers(name)[0])]
        command = docs.GENERATED[name]
        assert command in before or command.replace(" write_readme=true", "") in before, (name, command)


def test_write_block_replaces_only_its_block(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("intro\n<!-- a:begin -->\nold\n<!-- a:end -->\nrest\n")
    (tmp_path / "docs" / "x.md").write_text("<!-- b:begin -->\nkept\n<!-- b:end -->\n")
    assert docs.write_block("a", "new", tmp_path) == tmp_path / "README.md"
    assert (tmp_path / "README.md").read_text() == "intro\n<!-- a:begin -->\nnew\n<!-- a:end -->\nrest\n"
    assert docs.read_block("b", tmp_path) == "kept"
    with pytest.raises(ValueError, match="exactly one"):
        docs.write_block("c", "text", tmp_path)


@pytest.mark.parametrize("block", ["compare", "long_sequences", "pipelines", "offload_levels"])
def test_compare_block_is_rendered_from_its_saved_results(block):
    results = json.loads((docs.ROOT / "docs" / "results" / f"{block}.json").read_text())
    assert docs.read_block(block) == compare_report.readme_block(results).strip(), \
        f"the {block} block is stale: rerun `{docs.GENERATED[block]}`"
    if f"{block}_summary" in docs.blocks():  # its short form elsewhere (README's offload table)
        assert docs.read_block(f"{block}_summary") == offload_report.summary_block(results).strip(), \
            f"the {block}_summary block is stale: rerun `{docs.GENERATED[block]}`"
    plots = list(compare_report.PLOTS.values()) + ([pipeline_report.PLOT] if pipeline_report.pipelined(results) else [])
    plots += [offload_report.PLOT] if offload_report.offloaded(results) else []
    for name in plots:
        assert (docs.ROOT / "docs" / "figures" / f"{block}_{name}").stat().st_size > 0


@pytest.mark.parametrize("model,block", [("gpt_7_5b", None), ("gpt3_175b", None), ("llama2_7b", None),
                                         ("gpt3_175b", "plan_pipeline model=gpt3_175b"),
                                         ("bloom_176b", "plan_pipeline model=bloom_176b")])
def test_plan_block_is_rendered_from_its_saved_results(model, block):
    block = block or plan_cli.doc_block(model)
    results = json.loads(plan_cli.results_file(model, docs.ROOT, block).read_text())
    assert docs.read_block(block) == markdown(results).strip(), \
        f"the {block!r} block is stale: rerun `{docs.GENERATED[block]}`"


def test_pipeline_bubble_block_is_the_newest_results_table():
    from benchmarks import pipeline as pipeline_bench

    newest = sorted(pipeline_bench.RESULTS.glob("*.json"))[-1]
    assert docs.read_block(pipeline_bench.DOC_BLOCK) == pipeline_bench.table(json.loads(newest.read_text())).strip()


def test_benchmark_block_is_the_newest_results_table():
    newest = benchmark_report.newest()
    assert newest is not None, "no benchmarks/results/*.json: run `python -m benchmarks.strategies`"
    assert docs.read_block(benchmark_report.DOC_BLOCK) == benchmark_report.table(json.loads(newest.read_text())).strip(), \
        f"docs/benchmark.md's table is not {newest.name}'s; rerun `python -m benchmarks.strategies`"


@pytest.mark.slow
def test_strategy_table_is_what_the_compiler_prints():
    from experiments.strategies import DOC_BLOCK, StrategiesConfig, table

    assert docs.read_block(DOC_BLOCK) == table("gpt", "tiny", 8, StrategiesConfig().strategies).strip(), \
        "README's strategy table is stale: rerun `python -m experiments.strategies write_readme=true`"


def test_docs_links_resolve():
    for path in docs.doc_files():
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_readme_is_a_first_read():
    """What it is, the two commands, the first results, three examples, then links: short, and
    nothing outside the repository (users do not have `../shared`)."""
    text = (docs.ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    assert text.count('pip install -e ".[dev]" && python -m experiments.train') == 1
    assert text.count('pip install -e ".[dev]" && pytest') == 1
    assert "../" not in text and "pytest -m \"not slow\"" in text and "download.pytorch.org/whl/cpu" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Two commands", "## First results", "## Three examples", "## Read more"]


def test_requires_python_allows_every_version_torch_ships_wheels_for():
    """torch 2.13.0 ships wheels for CPython 3.10 to 3.14 (pypi.org/simple/torch)."""
    specifiers = pytest.importorskip("packaging.specifiers")
    pyproject = (docs.ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+: read the one line
    allowed = specifiers.SpecifierSet(re.search(r'^requires-python = "(.+)"$', pyproject, re.M).group(1))
    assert all(version in allowed for version in ("3.10", "3.11", "3.12", "3.13", "3.14"))
    assert "3.9" not in allowed and '"torch==2.13.0"' in pyproject
