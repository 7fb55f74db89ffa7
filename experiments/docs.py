"""The generated blocks of README.md and docs/*.md: where each lives and how a command rewrites it.

A block is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; the command that writes
it finds the one file that holds its markers. `GENERATED` names every block and its command;
`tests/test_docs.py` checks that each block in the files is one of them and is current.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OFFLOAD_LEVELS = "python -m experiments.compare --config-name compare_offload write_readme=true"
# Block name -> the command that writes it.
GENERATED = {
    "strategies": "python -m experiments.strategies write_readme=true",
    "compare": "python -m experiments.compare write_readme=true",
    "benchmark": "python -m benchmarks.strategies",
    "plan model=gpt_7_5b": "python -m experiments.plan model=gpt_7_5b write_readme=true",
    "plan model=gpt3_175b": "python -m experiments.plan write_readme=true",
    "plan model=llama2_7b": "python -m experiments.plan --config-name plan_long_sequence write_readme=true",
    "long_sequences": "python -m experiments.compare 'strategies=[tp_sp, ulysses, ulysses_zero3, ring, tp_cp]' "
                      "model=gpt_small "
                      "model.dtype=float64 steps=10 doc_block=long_sequences write_readme=true",
    "pipelines": "python -m experiments.compare 'runs=[pp, zero3_pp, dp_tp_pp, zero1_tp_pp, "
                 "{name: pp_gpipe, strategy: pp, pipeline: {schedule: gpipe}}, "
                 "{name: pp_zb_h1, strategy: pp, pipeline: {schedule: zb_h1}}]' steps=10 doc_block=pipelines "
                 "write_readme=true",
    "pipeline_bubble": "python -m benchmarks.pipeline",
    "offload_levels": OFFLOAD_LEVELS,
    "offload_levels_summary": OFFLOAD_LEVELS,  # the same run's short table, in README
    "plan_pipeline model=gpt3_175b": "python -m experiments.plan --config-name plan_pipeline write_readme=true",
    "plan_pipeline model=bloom_176b": "python -m experiments.plan --config-name plan_pipeline model=bloom_176b "
                                      "mesh=dp8_pp12_tp4 'strategies=[zero1_tp_pp]' micro_batch=2 global_batch=2048 "
                                      "write_readme=true",
}
_MARKER = re.compile(r"<!-- (.+?):begin -->")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(root: Path = ROOT) -> dict[str, list[Path]]:
    """Every block name in README.md and docs/*.md, with the files that hold it."""
    found: dict[str, list[Path]] = {}
    for path in doc_files(root):
        for name in _MARKER.findall(path.read_text()):
            found.setdefault(name, []).append(path)
    return found


def _home(name: str, root: Path) -> Path:
    holders = blocks(root).get(name, [])
    if len(holders) != 1:
        where = ", ".join(str(p.relative_to(root)) for p in holders) or "no file"
        raise ValueError(f"the generated block {name!r} must be in exactly one of README.md and docs/*.md "
                         f"(found in {where}); add its markers {markers(name)} where it belongs")
    return holders[0]


def read_block(name: str, root: Path = ROOT) -> str:
    begin, end = markers(name)
    return _home(name, root).read_text().split(begin)[1].split(end)[0].strip()


def write_block(name: str, text: str, root: Path = ROOT) -> Path:
    """Replace block `name` with `text` in the file that holds it; returns that file."""
    path = _home(name, root)
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", path.read_text()))
    return path
