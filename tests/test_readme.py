"""The README's API example runs as written (docs that execute do not rot)."""
from __future__ import annotations

import pathlib
import re

import pytest


def test_readme_api_example_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["metrics"]["loss"].item() < namespace["metrics"]["loss"].new_tensor(4.7).item()


@pytest.mark.slow
def test_readme_strategy_table_is_what_the_compiler_prints():
    """README's strategy table is generated (`python -m experiments.strategies write_readme=true`), not typed."""
    from experiments.strategies import README_MARKERS, StrategiesConfig, table

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = README_MARKERS
    written = readme.split(begin)[1].split(end)[0].strip()
    assert written == table("gpt", "tiny", 8, StrategiesConfig().strategies).strip()


def test_readme_any_model_example_lowers_hugging_face_gpt2():
    """README's bring-your-own-module example lowers as written; its MLP is Megatron's (two all-reduces
    over tp per layer and step, none gathered)."""
    import pytest

    pytest.importorskip("transformers")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "functional_call" in b)
    namespace: dict = {}
    exec(compile(source.replace("print(lowered.summary())", ""), "README.md", "exec"), namespace)
    tp = [c for c in namespace["lowered"].collectives if c["axes"] == ("tp",)]
    assert [c["kind"] for c in tp] == ["all_reduce"] * 4, [(c["kind"], c["shape"]) for c in tp]


def test_readme_rules_at_work_print_what_readme_shows():
    """README's one-function-per-rule block prints exactly the listing under it."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("#### The rules at work"):]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    listing = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    assert run_rules_at_work(source) == listing


def run_rules_at_work(source: str) -> str:
    """What the block prints, its lines named `rules_at_work.py:N` (N counted in the block)."""
    import contextlib
    import io
    import linecache

    name = "rules_at_work.py"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # no file: kept as is
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, name, "exec"), {"__name__": "rules_at_work"})
    return printed.getvalue()
