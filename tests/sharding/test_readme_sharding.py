"""README's sharding example runs as written on 4 gloo ranks and matches the reference."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from functional_parallel.launch import spawn


def _run_example(rank, world, source):
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    return namespace["metrics"]["loss"], namespace["full"]


@pytest.mark.slow
def test_readme_sharding_example_runs_on_four_ranks():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from sharding" in b)
    source = source.replace("print(step.lower(*local).summary())", "summary = step.lower(*local).summary()")
    torch.manual_seed(0)
    results = spawn(_run_example, 4, source, timeout_s=180)
    losses = [loss.item() for loss, _ in results]
    assert max(losses) - min(losses) == 0 and 3.5 < losses[0] < 5.0
