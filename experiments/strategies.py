"""`python -m experiments.strategies`: the collectives each strategy lowers to, as a markdown table.

No processes run: every strategy's train step is lowered on an abstract mesh, so the table is
exactly what the compiler inserts (README's strategy table is this command's output).
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("experiments.strategies")

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from experiments.cli import one_line_errors
from experiments.docs import write_block
from experiments.config import SEQUENCE_STRATEGIES, TABLE_STRATEGIES
from functional_parallel.parallel import available_strategies, example_mesh, lower_abstract
from sharding.cost import collective_counts
DOC_BLOCK = "strategies"  # README.md (experiments.docs)


@dataclass
class StrategiesConfig:
    arch: str = "gpt"
    size: str = "tiny"
    global_batch: int = 8
    strategies: list = field(default_factory=lambda: TABLE_STRATEGIES + SEQUENCE_STRATEGIES)  # each on its example_mesh
    write_readme: bool = False


ConfigStore.instance().store(name="strategies_config", node=StrategiesConfig)


def table(arch: str, size: str, global_batch: int, strategies, progress=None) -> str:
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "p2p")
    lines = [f"Train step of `{arch}/{size}` (AdamW, global batch {global_batch}), per rank; "
             f"cells are count × kind on a mesh axis (dp+tp: one collective over both), with bytes.", "",
             "| strategy | mesh | " + " | ".join(kinds) + " | bytes moved | peak bytes |",
             "|---|---|" + "---|" * len(kinds) + "---|---|"]
    known = available_strategies()
    unknown = [name for name in strategies if name not in known]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; expected some of {known}")
    for name in strategies:
        full = example_mesh(name)
        mesh = {a: s for a, s in full.items() if s > 1}
        started = time.perf_counter()
        _, _, lowered = lower_abstract(arch, size, name, full, global_batch)
        if progress is not None:
            progress(name, time.perf_counter() - started)
        groups = collective_counts(lowered.collectives)
        cells = [", ".join(f"{g['count']}× {g['axes']} ({g['bytes']:,} B)"
                           for g in sorted(groups, key=lambda g: g["axes"]) if g["kind"] == kind) or "—"
                 for kind in kinds]
        lines.append(f"| {name} | {' × '.join(f'{a}={s}' for a, s in mesh.items())} | " + " | ".join(cells)
                     + f" | {lowered.cost['bytes_moved']:,} | {lowered.cost['peak_bytes']:,} |")
    return "\n".join(lines)


@hydra.main(version_base=None, config_name="strategies_config")
def main(cfg: StrategiesConfig) -> None:
    cfg = OmegaConf.to_object(cfg)
    from rich.console import Console

    console = Console(stderr=True)  # status on stderr: stdout is the table
    with one_line_errors(), console.status(f"lowering {len(cfg.strategies)} strategies on an abstract mesh...") as live:
        text = table(cfg.arch, cfg.size, cfg.global_batch, cfg.strategies,
                     progress=lambda name, seconds: live.update(f"{name} lowered in {seconds:.1f} s; next..."))
    print(text)
    if cfg.write_readme:
        print(f"wrote {write_block(DOC_BLOCK, text, Path(hydra.utils.get_original_cwd()))}", file=sys.stderr)


if __name__ == "__main__":
    main()
