"""README's and docs' examples run as written (docs that execute do not rot)."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_docs_api_example_runs():
    source = next(b for b in python_blocks(ROOT / "docs" / "training.md") if "make_train_step" in b)
    namespace: dict = {}
    exec(compile(source, "training.md", "exec"), namespace)
    assert namespace["metrics"]["loss"].item() < 4.7


def test_readme_bring_your_own_module_example_runs():
    pytest.importorskip("transformers")
    source = next(b for b in python_blocks(ROOT / "README.md") if "make_functional" in b)
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    assert 3.5 < namespace["loss"].item() < 4.8  # about ln(64) from a fresh init
    assert "lm_head.weight" not in namespace["params"] and "transformer.wte.weight" in namespace["params"]


@pytest.mark.slow
def test_readme_sharding_example_runs_as_pasted(tmp_path):
    """Example 2, saved as a file and run with `python example.py`: it starts its own 4 ranks."""
    source = next(b for b in python_blocks(ROOT / "README.md") if "spawn(train, 4)" in b)
    (tmp_path / "example.py").write_text(source)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary, results = done.stdout.rsplit("\n", 2)[0], eval(done.stdout.strip().splitlines()[-1])
    assert len(results) == 4 and len({loss for loss, _ in results}) == 1 and 3.5 < results[0][0] < 5.0
    assert len({norm for _, norm in results}) == 1  # the unsharded parameters agree on every rank
    assert "reduce_scatter  tp" in summary and "backward" in summary and "grad of params/" in summary
    assert not [line for line in summary.splitlines() if "all_gather" in line and "params/" in line], summary


def test_docs_any_model_example_lowers_hugging_face_gpt2():
    """The bring-your-own-module example in docs/rules.md lowers as written; its MLP is Megatron's
    (two all-reduces over tp per layer and step, none gathered)."""
    pytest.importorskip("transformers")
    source = next(b for b in python_blocks(ROOT / "docs" / "rules.md") if "functional_call" in b)
    namespace: dict = {}
    exec(compile(source.replace("print(lowered.summary())", ""), "rules.md", "exec"), namespace)
    tp = [c for c in namespace["lowered"].collectives if c["axes"] == ("tp",)]
    assert [c["kind"] for c in tp] == ["all_reduce"] * 4, [(c["kind"], c["shape"]) for c in tp]
    # The tied embedding's gradient (autograd's sum of its two uses) is named by a model line, not `step`'s.
    tied = next(c for c in namespace["lowered"].collectives if c.get("leaf") == "grad of params/transformer.wte.weight")
    assert tied["phase"] == "backward" and "in step" not in tied["source"], tied["source"]


def test_docs_rules_at_work_print_what_the_docs_show():
    """The one-function-per-rule block in docs/rules.md prints exactly the listing under it."""
    text = (ROOT / "docs" / "rules.md").read_text()
    section = text[text.index("## The rules at work"):]
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
