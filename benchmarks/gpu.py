"""`python -m benchmarks.gpu`: one GPU, a ~1B-parameter GPT in bf16, our per-rank graph through
`torch.compile` against plain torch (eager and `torch.compile`d) on the same math; tokens/s and MFU.

The same math: bf16 parameters compute the loss and its gradient, fp32 masters take AdamW's update
and are cast back (ZeRO's and Megatron's mixed precision). Ours is `make_train_step(...,
precision="bf16")` lowered by `sharding` for one rank and compiled whole; torch's is
`benchmarks.torch_model.GPTModule` over the bf16 copy, with the fp32 masters updated by
`torch.optim.AdamW` and copied back. MFU counts 6N + 12·L·d·s FLOPs per token (N parameters,
L layers, width d, sequence s: PaLM's appendix B) against the GPU's dense bf16 peak.

    python -m benchmarks.gpu                                   # ~1.0B GPT, one GPU, under 8 minutes
    python -m benchmarks.gpu d_model=64 n_layers=2 seq_len=32 vocab_size=128 batch=2 compile=false  # any CPU

Writes `benchmarks/results/gpu/<date>.json` and `.md`. Without CUDA it runs on the CPU (MFU only
with `peak_tflops=`); CI runs it that way at a tiny size (tests/test_benchmarks.py). For several
GPUs and NCCL: `python -m benchmarks.strategies device=cuda`.
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("benchmarks.gpu")

import datetime
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from functional_parallel import optim
from functional_parallel.launch import spawn
from functional_parallel.models import build
from functional_parallel.parallel import Strategy, compile_step
from functional_parallel.precision import Precision, init_state
from functional_parallel.train import make_train_step
from functional_parallel.tree import tree_leaves, tree_map

from . import report
from .torch_model import GPTModule

# Dense bf16 peak FLOP/s by device name (the vendors' data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
CONTENDERS = ("ours_compiled", "torch_eager", "torch_compiled")


@dataclass
class GPUBenchConfig:
    d_model: int = 2048  # with 18 layers and vocab 32768: 1.04B parameters
    n_layers: int = 18
    n_heads: int = 16
    seq_len: int = 2048
    vocab_size: int = 32768
    batch: int = 8
    lr: float = 1e-4
    warmup_steps: int = 3  # not timed; the first one compiles
    steps: int = 10
    contenders: list = field(default_factory=lambda: list(CONTENDERS))
    compile: bool = True  # false: the *_compiled contenders run eager (a CPU without time to compile)
    device: str = "auto"  # auto (cuda when present) | cuda | cpu
    peak_tflops: Optional[float] = None  # the device's dense bf16 peak (default: PEAK_BF16 by GPU name)
    write: bool = True  # JSON + markdown into benchmarks/results/


ConfigStore.instance().store(name="gpu_benchmark_config", node=GPUBenchConfig)


def flops_per_token(parameters: int, cfg: GPUBenchConfig) -> int:
    return 6 * parameters + 12 * cfg.n_layers * cfg.d_model * cfg.seq_len


def _device(cfg: GPUBenchConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device=cuda but torch sees no GPU")
    return torch.device(cfg.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """Our step for one rank (`dp` on a 1-rank mesh): the whole per-rank graph `torch.compile`d."""

    def __init__(self, model, params, batches, cfg: GPUBenchConfig, compiled: bool):
        from sharding import Mesh
        from sharding.compile import compile_lowered

        optimizer = optim.adamw(cfg.lr)
        precision = Precision.named("bf16")
        self.params, self.state = init_state(optimizer, params, precision)
        step, _ = compile_step(make_train_step(model.loss, optimizer, precision=precision), Strategy.load("dp"),
                               Mesh({"dp": 1}), self.params, self.state, axes=model.axes(params))
        lowered = step.lower(self.params, self.state, batches[0])
        self.lowered = compile_lowered(lowered) if compiled else lowered
        self.batches = batches

    def step(self, i: int) -> float:
        self.params, self.state, metrics = self.lowered.run(self.params, self.state, self.batches[i % len(self.batches)])
        return metrics["loss"]


class Torch:
    """`GPTModule` over the bf16 copy; fp32 masters updated by torch's AdamW and copied back."""

    def __init__(self, model, params, batches, cfg: GPUBenchConfig, compiled: bool, device: torch.device):
        self.module = GPTModule(tree_map(lambda p: p.to(torch.bfloat16), params), model.cfg).to(device)
        self.weights = list(self.module.parameters())
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in self.weights]
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(self.masters, lr=cfg.lr, weight_decay=0.01, **fused)  # as optim.adamw
        self.forward = torch.compile(self.module) if compiled else self.module
        self.batches = batches

    def step(self, i: int) -> float:
        loss = self.forward(self.batches[i % len(self.batches)])
        loss.backward()
        for master, weight in zip(self.masters, self.weights):
            master.grad = weight.grad.float()
            weight.grad = None
        self.optimizer.step()
        with torch.no_grad():
            for master, weight in zip(self.masters, self.weights):
                weight.copy_(master)
        return loss.detach()



def _timed(runner, cfg: GPUBenchConfig, device: torch.device) -> dict:
    losses = [float(runner.step(i)) for i in range(cfg.warmup_steps)]
    times = []
    for i in range(cfg.warmup_steps, cfg.warmup_steps + cfg.steps):
        _sync(device)
        started = time.perf_counter()
        loss = runner.step(i)
        _sync(device)
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
    return {"step_ms_median": 1e3 * statistics.median(times), "step_ms": [round(1e3 * t, 3) for t in times],
            "losses": losses}


def run_rank(rank: int, world: int, cfg_dict: dict) -> dict:
    cfg = GPUBenchConfig(**cfg_dict)
    device = _device(cfg)
    model = build("gpt", "tiny", d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                  seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    params = tree_map(lambda p: p.to(device), model.init(0))
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq_len + 1), generator=generator).to(device)
        batches.append({"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()})
    parameters = sum(p.numel() for p in tree_leaves(params))
    results = {}
    for name in cfg.contenders:
        compiled = cfg.compile and name.endswith("_compiled")
        started = time.perf_counter()
        if name.startswith("ours"):
            runner = Ours(model, params, batches, cfg, compiled)
        else:
            runner = Torch(model, params, batches, cfg, compiled, device)
        setup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        entry = _timed(runner, cfg, device) | {"setup_s": setup_s, "compiled": compiled}
        entry["tokens_per_s"] = cfg.batch * cfg.seq_len / (entry["step_ms_median"] / 1e3)
        if device.type == "cuda":
            entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        results[name] = entry
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else next(
        (value for key, value in PEAK_BF16.items() if key in name), None)
    for entry in results.values():
        entry["mfu"] = entry["tokens_per_s"] * flops_per_token(parameters, cfg) / peak if peak else None
    return {"device": name, "peak_flops": peak, "parameters": parameters,
            "flops_per_token": flops_per_token(parameters, cfg), "contenders": results}


def run(cfg: GPUBenchConfig) -> dict:
    unknown = [name for name in cfg.contenders if name not in CONTENDERS + ("ours_eager",)]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; expected some of {list(CONTENDERS) + ['ours_eager']}")
    backend = "nccl" if _device(cfg).type == "cuda" else "gloo"
    started = datetime.datetime.now(datetime.timezone.utc)
    result = spawn(run_rank, 1, asdict(cfg), timeout_s=900, backend=backend)[0]
    return {"date": started.strftime("%Y-%m-%dT%H-%M-%SZ"), "torch": torch.__version__, "config": asdict(cfg),
            "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), **result}


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"GPU benchmark `{results['date']}` on {results['device']}: GPT d_model {cfg['d_model']}, "
             f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, seq {cfg['seq_len']}, vocab {cfg['vocab_size']} "
             f"({results['parameters'] / 1e6:,.1f}M parameters), batch {cfg['batch']}, bf16 with fp32 masters, AdamW; "
             f"{results['flops_per_token'] / 1e9:.3g} GFLOP per token.", "",
             "| contender | compiled | median step (ms) | tokens/s | MFU | peak memory | first loss | last loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["contenders"].items():
        mfu = "—" if entry["mfu"] is None else f"{100 * entry['mfu']:.1f}%"
        memory = f"{entry['peak_memory_bytes'] / 2**30:.1f} GiB" if entry.get("peak_memory_bytes") else "—"
        lines.append(f"| {name} | {'yes' if entry['compiled'] else 'no'} | {entry['step_ms_median']:.1f} | "
                     f"{entry['tokens_per_s']:,.0f} | {mfu} | {memory} | {entry['losses'][0]:.4f} | "
                     f"{entry['losses'][-1]:.4f} |")
    return "\n".join(lines)


@hydra.main(version_base=None, config_name="gpu_benchmark_config")
def main(cfg: GPUBenchConfig) -> None:
    results = run(OmegaConf.to_object(cfg))
    print(table(results))
    if results["config"]["write"]:
        json_path, md_path = report.write(results, report.RESULTS_DIR / "gpu", table)
        print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
