"""`python -m benchmarks.pipeline`: each pipeline schedule's measured bubble against its formula.

One GPT with equal stages (its layers split evenly, the embedding and head small) trains on
`stages` gloo ranks (one thread each) under the `pp` strategy with every schedule and micro-batch
count; each timed step records when each rank ran each action and how long its receives blocked
(`sharding.timeline`), and the bubble is the idle share of the ranks' time from the first action
to the last (median over the timed steps). Writes `benchmarks/results/pipeline/<date>.json` and
`.md`, and the table into docs/pipelines.md (`write_readme=false` to skip). On demand only.
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("benchmarks.pipeline")

import datetime
import json
import os
import pathlib
import statistics
from dataclasses import asdict, dataclass, field

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from functional_parallel.launch import spawn

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "pipeline"  # apart from benchmarks.strategies' results
DOC_BLOCK = "pipeline_bubble"


@dataclass
class PipelineBenchConfig:
    schedules: list = field(default_factory=lambda: ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1"])
    microbatches: list = field(default_factory=lambda: [4, 8])
    stages: int = 2
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 4
    seq_len: int = 64
    vocab_size: int = 64
    rows_per_microbatch: int = 2
    steps: int = 5  # timed (after one untimed step)
    threads: int = 1
    write_readme: bool = True


ConfigStore.instance().store(name="pipeline_bench", node=PipelineBenchConfig)


def _measure(rank: int, world: int, cfg: dict) -> list[dict]:
    """On each rank: every (schedule, micro-batches) run; this rank's action spans per timed step."""
    import torch.distributed as dist

    from functional_parallel import optim
    from functional_parallel.models import build
    from functional_parallel.parallel import Strategy, compile_step, param_logical_axes
    from functional_parallel.train import make_train_step
    from sharding import Mesh, shard, timeline

    torch.set_num_threads(cfg["threads"])
    model = build("gpt", "tiny", d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                  seq_len=cfg["seq_len"], vocab_size=cfg["vocab_size"])
    mesh, strategy = Mesh({"dp": 1, "pp": world}), Strategy.load("pp")
    found = []
    for schedule in cfg["schedules"]:
        virtual = 2 if schedule == "interleaved_1f1b" else 1
        for microbatches in cfg["microbatches"]:
            params = model.init(0)
            optimizer = optim.adamw(1e-3)
            opt_state = optimizer.init(params)
            step = make_train_step(model.loss, optimizer, microbatches)
            compiled, (pspecs, sspecs, bspec) = compile_step(step, strategy, mesh, params, opt_state,
                                                             axes=param_logical_axes(model, params),
                                                             schedule=schedule, virtual=virtual)
            tokens = torch.randint(0, cfg["vocab_size"], (cfg["rows_per_microbatch"] * microbatches, cfg["seq_len"]),
                                   generator=torch.Generator().manual_seed(0))
            p, s, b = shard(params, pspecs, mesh), shard(opt_state, sspecs, mesh), \
                shard({"inputs": tokens, "targets": tokens}, bspec, mesh)
            p, s, _ = compiled(p, s, b)  # untimed: lazily made process-group state, caches
            steps = []
            for _ in range(cfg["steps"]):
                dist.barrier()
                with timeline.recording() as records:
                    p, s, _ = compiled(p, s, b)
                steps.append(timeline.spans(records))
            found.append({"schedule": schedule, "microbatches": microbatches, "virtual": virtual, "steps": steps})
    return found


def run(cfg: PipelineBenchConfig) -> dict:
    from sharding import timeline
    from sharding.schedules import bubble_formula

    started = datetime.datetime.now(datetime.timezone.utc)
    per_rank = spawn(_measure, cfg.stages, asdict(cfg), timeout_s=900)
    rows = []
    for index, run_ in enumerate(per_rank[0]):
        bubbles = [timeline.bubble([rank[index]["steps"][k] for rank in per_rank]) for k in range(cfg.steps)]
        spans = [[s for s in rank[index]["steps"][-1] if s["action"] != "update"] for rank in per_rank]
        rows.append({"schedule": run_["schedule"], "stages": cfg.stages, "microbatches": run_["microbatches"],
                     "virtual": run_["virtual"], "bubble_measured": statistics.median(bubbles),
                     "bubble_formula": bubble_formula(run_["schedule"], cfg.stages, run_["microbatches"],
                                                      run_["virtual"]),
                     "step_ms": 1e3 * (max(s["end"] for r in spans for s in r) - min(s["start"] for r in spans
                                                                                     for s in r))})
    return {"date": started.strftime("%Y-%m-%dT%H-%M-%SZ"), "config": asdict(cfg), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "rows": rows}


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"GPT d_model={cfg['d_model']}, {cfg['n_layers']} layers ({cfg['n_layers'] // cfg['stages']} per stage), "
             f"seq {cfg['seq_len']}, {cfg['rows_per_microbatch']} rows per micro-batch, float32; {cfg['stages']} "
             f"gloo ranks, {cfg['threads']} thread each; median of {cfg['steps']} timed steps "
             f"(`python -m benchmarks.pipeline`, {results['date']}).", "",
             "| schedule | stages | micro-batches | virtual | bubble measured | bubble formula | pipeline ms |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        formula = f"{row['bubble_formula']:.3f}" if row["bubble_formula"] is not None else "n/a"
        lines.append(f"| {row['schedule']} | {row['stages']} | {row['microbatches']} | {row['virtual']} | "
                     f"{row['bubble_measured']:.3f} | {formula} | {row['step_ms']:.1f} |")
    return "\n".join(lines)


@hydra.main(version_base=None, config_name="pipeline_bench")
def main(cfg) -> None:
    results = run(PipelineBenchConfig(**OmegaConf.to_container(cfg, resolve=True)))
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / results["date"]
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    if cfg.write_readme:
        from experiments.docs import write_block

        print(f"wrote {write_block(DOC_BLOCK, table(results))}")


if __name__ == "__main__":
    main()
