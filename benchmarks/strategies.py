"""`python -m benchmarks.strategies`: our strategies against torch's DDP and FSDP2, side by side.

Every contender trains the same tiny GPT from the same init on the same batches over the same
ranks (gloo on CPU; `device=cuda` for NCCL on GPUs). Writes `benchmarks/results/<date>.json`
and `.md` (and `<date>-timeline.png`: one step of ours per rank, compute against each collective
stream), and the table and figure into docs/benchmark.md and docs/figures/ (`write_readme=false`
to skip). On demand only, not in CI.

    python -m benchmarks.strategies                       # docs/benchmark.md's table
    python -m benchmarks.strategies compile=true          # ours with torch.compile'd per-rank graphs
    python -m benchmarks.strategies device=cuda           # NCCL, one GPU per rank
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("benchmarks.strategies")

import datetime
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from functional_parallel.launch import spawn
from functional_parallel.parallel import available_strategies, example_mesh

from experiments.docs import write_block

from . import report, timeline
from .measure import run_rank
from .runners import TORCH_CONTENDERS



@dataclass
class BenchmarkConfig:
    contenders: list = field(default_factory=lambda: ["dp", "zero1", "zero2", "zero3", "tp", "tp_sp", "ddp", "fsdp2",
                                                      "torch_tp", "torch_tp_sp"])
    world_size: int = 4
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    vocab_size: int = 256
    batch_per_rank: int = 8
    lr: float = 1e-3
    warmup_steps: int = 3
    rounds: int = 5
    steps_per_round: int = 4
    threads: int = 1  # torch intra-op threads per rank (4 ranks share the cores)
    device: str = "cpu"  # cpu (gloo) | cuda (nccl, one GPU per rank)
    compile: bool = False  # torch.compile our per-rank graphs (needs a C++ compiler on CPU)
    bucket_bytes: Optional[int] = None  # ours: jit's bucket size (None: its default, DDP's 25 MiB)
    bucket_per_layer: bool = False  # ours: no bucket mixes two layers (FSDP2's per-block unit)
    write: bool = True  # results JSON + markdown into benchmarks/results/
    write_readme: bool = True


ConfigStore.instance().store(name="benchmark_config", node=BenchmarkConfig)


def run(cfg: BenchmarkConfig) -> dict:
    known = available_strategies() + list(TORCH_CONTENDERS)
    unknown = [name for name in cfg.contenders if name not in known]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; expected some of {known}")
    sizes = {name: math.prod(example_mesh(name).values()) for name in cfg.contenders if name not in TORCH_CONTENDERS}
    wrong = {name: size for name, size in sizes.items() if size != cfg.world_size}
    if wrong:
        raise SystemExit(f"our strategies run on their example meshes (the strategy files' example_mesh); these do "
                         f"not have world_size={cfg.world_size} ranks: {wrong}")
    if cfg.device == "cuda" and torch.cuda.device_count() < cfg.world_size:
        raise SystemExit(f"device=cuda needs {cfg.world_size} GPUs (one per rank); found {torch.cuda.device_count()}")
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    per_rank = spawn(run_rank, cfg.world_size, asdict(cfg), timeout_s=600, backend=backend)
    contenders = report.combine(per_rank)
    latency = per_rank[0]["collective_latency_ms"]
    return {
        "date": started.strftime("%Y-%m-%dT%H-%M-%SZ"),
        "machine": {"backend": backend, "device": cfg.device, "cpu_count": os.cpu_count(),
                    "loadavg_before": load_before, "collective_latency_ms": latency, "loadavg_after": os.getloadavg(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
                    "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()},
        "config": asdict(cfg),
        "contenders": contenders,
        "targets": report.targets(contenders),
    }


@hydra.main(version_base=None, config_name="benchmark_config")
def main(cfg: BenchmarkConfig) -> None:
    cfg = OmegaConf.to_object(cfg)
    results = run(cfg)
    text = report.table(results)
    print(text)
    if cfg.write:
        json_path, md_path = report.write(results)
        figure = timeline.plot(results, json_path.with_name(f"{results['date']}-timeline.png"))
        print(f"wrote {json_path}, {md_path}" + (f" and {figure}" if figure else ""))
    if cfg.write_readme:
        print(f"wrote {write_block(report.DOC_BLOCK, text)}")
        figure = timeline.plot(results, timeline.FIGURE)
        print(f"wrote {figure}" if figure else "no timeline figure: none of ours ran")


if __name__ == "__main__":
    main()
