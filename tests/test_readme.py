"""The README's API example runs as written (docs that execute do not rot)."""
from __future__ import annotations

import pathlib
import re


def test_readme_api_example_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["metrics"]["loss"].item() < namespace["metrics"]["loss"].new_tensor(4.7).item()
