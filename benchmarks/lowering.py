"""`python -m benchmarks.lowering`: how long lowering a train step takes, and how it grows with depth.

GPT-2 124M's shape (d 768, 12 heads, seq 1024, vocab padded to 50304) is lowered on fake tensors on
an abstract mesh (no processes) at a shallow and a deep layer count under each strategy. Each
stage's seconds come from `Lowered.timings`. The table gives the deep/shallow ratio, which
identical blocks traced once would keep near 1. Writes `benchmarks/results/lowering/<date>.json`
and `.md`. On demand only; tests/test_benchmarks.py runs it at a tiny size.
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("benchmarks.lowering")

import datetime
import json
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "lowering"
STAGES = ("trace_s", "remat_s", "propagate_s", "insert_s", "localize_s", "split_s", "schedule_s", "place_s", "bind_s",
          "codegen_s")


@dataclass
class LoweringBenchConfig:
    strategies: list = field(default_factory=lambda: ["zero3", "tp_sp"])
    layers: list = field(default_factory=lambda: [2, 12])  # shallow, deep
    size: str = "gpt2_124m"
    vocab_size: int = 50304  # GPT-2's 50257 padded so that it splits over 4 ranks
    global_batch: int = 8
    write: bool = True


ConfigStore.instance().store(name="lowering_bench", node=LoweringBenchConfig)
MESHES = {"tp_sp": {"dp": 2, "tp": 2}, "tp": {"dp": 2, "tp": 2}, "fsdp_tp": {"dp": 2, "tp": 2}}  # else dp=4


def lower_once(strategy: str, layers: int, cfg: LoweringBenchConfig) -> dict:
    """Seconds to lower the AdamW train step (total and per stage) and the per-rank graph's size."""
    from functional_parallel.models import build
    from functional_parallel.parallel import Strategy
    from functional_parallel.planner import lower_fake
    from functional_parallel.precision import Precision

    model = build("gpt", cfg.size, n_layers=layers, vocab_size=cfg.vocab_size)
    started = time.perf_counter()
    lowered, *_ = lower_fake(model, Strategy.load(strategy), MESHES.get(strategy, {"dp": 4}), cfg.global_batch,
                             Precision.named("fp32"))
    return {"strategy": strategy, "layers": layers, "seconds": time.perf_counter() - started,
            "stages": {key: lowered.timings.get(key, 0.0) for key in STAGES},
            "nodes": len(lowered.graph.graph.nodes)}


def run(cfg: LoweringBenchConfig) -> dict:
    lower_once(cfg.strategies[0], cfg.layers[0], cfg)  # warm torch's caches: the first lowering pays for imports
    rows = [lower_once(strategy, layers, cfg) for strategy in cfg.strategies for layers in cfg.layers]
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ"),
            "config": asdict(cfg), "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows}


def table(results: dict) -> str:
    cfg = results["config"]
    shallow, deep = cfg["layers"][0], cfg["layers"][-1]
    lines = [f"Lowering the AdamW train step of `gpt/{cfg['size']}` at {shallow} and {deep} layers on fake tensors "
             f"(`python -m benchmarks.lowering`, {results['date']}, {results['cpu_count']} CPUs).", "",
             "| strategy | layers | seconds | trace | partition (other stages) | per-rank nodes | × shallow |",
             "|---|---|---|---|---|---|---|"]
    base = {row["strategy"]: row["seconds"] for row in results["rows"] if row["layers"] == shallow}
    for row in results["rows"]:
        trace = row["stages"]["trace_s"]
        rest = sum(seconds for key, seconds in row["stages"].items() if key != "trace_s")
        lines.append(f"| {row['strategy']} | {row['layers']} | {row['seconds']:.2f} | {trace:.2f} | {rest:.2f} | "
                     f"{row['nodes']:,} | {row['seconds'] / base[row['strategy']]:.2f} |")
    return "\n".join(lines)


@hydra.main(version_base=None, config_name="lowering_bench")
def main(cfg) -> None:
    cfg = LoweringBenchConfig(**OmegaConf.to_container(cfg))
    results = run(cfg)
    print(table(results))
    if cfg.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / results["date"]
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        stem.with_suffix(".md").write_text(table(results) + "\n")
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
