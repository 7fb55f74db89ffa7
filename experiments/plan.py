"""`python -m experiments.plan`: per-rank memory and traffic of every strategy at cluster scale, no training.

The train step of a published-size model (default GPT-3 175B) is lowered on fake tensors on an
abstract mesh (default dp=64 × tp=8 = 512 ranks, never started); memory by role and bytes per
mesh axis are read from the lowered graph (`functional_parallel.planner`) and printed next to
the ZeRO and Korthikanti et al. formulas (`functional_parallel.published`). Writes `plan.json`
and `plan.md` into the Hydra run dir.
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("experiments.plan")

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from experiments.builders import mesh_shape
from experiments.cli import one_line_errors
from experiments.config import TABLE_STRATEGIES, ModelConfig
from experiments.plan_report import markdown, print_tables
from experiments.docs import write_block
from functional_parallel import planner, planner_pipeline, published
from functional_parallel.models import build, config as model_config
from functional_parallel.parallel import OFFLOAD, Strategy, available_strategies, check_offload
from sharding import P
from sharding.remat import check_policy



@dataclasses.dataclass
class PlanConfig:
    """What to plan: a model, a mesh, strategies, a precision."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(arch="gpt", size="gpt3_175b"))
    mesh: Any = "dp64_tp8"  # a conf/meshes name or axis sizes in order: mesh='{dp: 32, tp: 8}'; never started
    meshes: Dict[str, Any] = dataclasses.field(default_factory=dict)  # strategy -> its own mesh (same ranks)
    strategies: List[str] = dataclasses.field(default_factory=lambda: list(TABLE_STRATEGIES))
    precision: str = "bf16"  # bf16: ZeRO's mixed precision (2 + 2 + 12 bytes/param) | fp32 (4 + 4 + 8)
    remat: str = "none"  # activation checkpointing: none | selective (attention core) | full (keep layer inputs)
    micro_batch: int = 1  # sequences per data-parallel rank (Korthikanti's b)
    depth: Optional[int] = 1  # lower depth and depth + 1 layers and extrapolate; null: lower the full depth
    vocab_multiple: int = 128  # the vocabulary is padded to a multiple of lcm(this, ranks), as Megatron does
    offload: str = "none"  # none | optimizer: master, Adam m, v on host | params: also the params and grads
    write_readme: bool = False  # also write the tables and results into docs/plan.md, docs/results/
    # Pipelined strategies (dp_tp_pp, zero1_tp_pp, ...): the schedule, micro-batches per step (null:
    # global_batch / (micro_batch x data-parallel ranks)) and virtual stages per rank.
    pipeline: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"schedule": "1f1b", "microbatches": None,
                                                                          "virtual": 1})
    global_batch: Optional[int] = None  # sequences per step (pipelined rows); null: micro_batch x dp
    doc_block: Optional[str] = None  # the docs block write_readme rewrites; null: "plan model=<model>"
    # The deepest model of this width that fits per rank, per offload level (fit.device_gb: null = no search).
    fit: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"device_gb": None, "host_gb": None})


ConfigStore.instance().store(name="plan_config", node=PlanConfig)


def _model_builder(cfg: PlanConfig):
    arch_only = {"n_kv_heads": cfg.model.n_kv_heads} if cfg.model.arch == "llama" else {
        "fused_qkv": cfg.model.fused_qkv, "attention": cfg.model.attention}
    base = model_config(cfg.model.arch, cfg.model.size, d_model=cfg.model.d_model, n_heads=cfg.model.n_heads,
                        seq_len=cfg.model.seq_len, **arch_only)
    base = dataclasses.replace(base, n_layers=cfg.model.n_layers or base.n_layers,
                               vocab_size=planner.mesh_padded_vocab(base.vocab_size, mesh_shape(cfg.mesh),
                                                                    cfg.vocab_multiple))
    return base, lambda n_layers: build(cfg.model.arch, cfg=dataclasses.replace(base, n_layers=n_layers))


def plan(cfg: PlanConfig, progress=None) -> dict[str, Any]:
    """Every strategy's figures and the matching published formulas, as one JSON-able dict."""
    if cfg.precision not in planner.PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(planner.PRECISIONS)}, got {cfg.precision!r}")
    check_policy(cfg.remat)
    known = available_strategies()
    unknown = [name for name in cfg.strategies if name not in known]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; expected some of {known}")
    check_offload(cfg.offload)
    precision = planner.PRECISIONS[cfg.precision]
    base, build_model = _model_builder(cfg)
    plan_mesh = mesh_shape(cfg.mesh)
    s, b, h, a = base.seq_len, cfg.micro_batch, base.d_model, base.n_heads
    act_bytes = precision.param_bytes
    k = precision.master_bytes + 2 * precision.state_bytes  # Adam: master copy, m, v
    rows = []
    ranks = math.prod(plan_mesh.values())
    meshes = {name: mesh_shape(value) for name, value in cfg.meshes.items()}
    for name, own in meshes.items():
        if math.prod(own.values()) != ranks:
            raise ValueError(f"meshes.{name} has {math.prod(own.values())} ranks, mesh has {ranks}; a strategy's own "
                             f"mesh keeps the rank count, so the rows compare one cluster")
    for name in cfg.strategies:
        strategy = Strategy.load(name)
        mesh = meshes.get(name, plan_mesh)
        dp = math.prod(mesh[axis] for axis in strategy.batch_dim_axes() if axis in mesh)  # data-parallel ranks
        if strategy.pipeline:
            rows.append(_pipeline_row(cfg, strategy, mesh, dp, base, build_model, precision))
            if progress is not None:
                progress(rows[-1])
            continue
        result = planner.plan_strategy(build_model, base.n_layers, strategy, mesh, cfg.micro_batch * dp, precision,
                                       cfg.depth, cfg.remat)
        t, sp = planner.model_axes(strategy, mesh)
        psi = result.figures["parameters"]
        row = {"strategy": name, "mesh": mesh, "t": t, "sp": sp, "figures": result.figures,
               "per_layer": result.per_layer,
               "lowered_depths": list(result.lowered_depths), "seconds": round(result.seconds, 2),
               "memory_by_kind": planner.memory_by_kind(result.figures, cfg.offload)}
        if cfg.fit.get("device_gb"):
            row["fit"] = _fit(cfg, result, base.n_layers)
        stage = published.ZERO_STAGES.get(name)
        if stage is not None:
            row["zero_formula_bytes"] = published.zero_model_state_bytes(stage, psi, dp, k, precision.param_bytes,
                                                                         precision.grad_bytes)
            row["zero_table_1_gb"] = published.ZERO_TABLE_1["gb"][name]
            row["zero_comm_formula_bytes"] = published.zero_comm_bytes(stage, psi, precision.grad_bytes)
        if cfg.model.arch == "gpt":
            row["korthikanti_layer_bytes"] = published.korthikanti_layer_bytes(s, b, h, a, t, sp, cfg.remat)
            row["layer_differences"] = published.layer_differences(s, b, h, a, t, sp, act_bytes, cfg.remat,
                                                                   base.attention)
        scheme = published.sequence_scheme(strategy.constrain_rules,
                                           set(P(*strategy.param_axes.values()).all_axes()))
        if scheme is not None:
            seq_axes = strategy.constrain_rules["seq"]
            row["sequence"] = _sequence_row(scheme, base, cfg.micro_batch * s, t, act_bytes) | {
                "axes": [seq_axes] if isinstance(seq_axes, str) else list(seq_axes)}
        rows.append(row)
        if progress is not None:
            progress(row)
    return {"model": {"arch": cfg.model.arch, "config": dataclasses.asdict(base)}, "mesh": plan_mesh,
            "ranks": ranks, "precision": dataclasses.asdict(precision) | {
                "compute_dtype": str(precision.compute_dtype).replace("torch.", "")},
            "micro_batch": b, "global_batch": b * dp, "depth": cfg.depth, "offload": cfg.offload, "remat": cfg.remat,
            "fit": dict(cfg.fit),
            "strategies": rows}


def _fit(cfg: PlanConfig, result, layers: int) -> dict:
    """Per offload level: the most layers whose per-rank memory fits `cfg.fit`, and their parameter count."""
    device, host = (None if cfg.fit.get(key) is None else int(cfg.fit[key] * 1e9) for key in ("device_gb", "host_gb"))
    found = {}
    for level in OFFLOAD:
        most = planner.largest_fit(result.figures, result.per_layer, layers, level, device, host)
        found[level] = {"layers": most, "parameters": result.figures["parameters"]
                        + (most - layers) * result.per_layer["parameters"] if most else 0}
    if not any(entry["layers"] for entry in found.values()):
        one = {key: result.figures.get(key, 0) + (1 - layers) * result.per_layer.get(key, 0) for key in result.figures}
        split = planner.memory_by_kind(one, "disk")
        raise ValueError(f"fit: not even one layer of this model fits {cfg.fit['device_gb']:g} GB of device memory"
                         f"{'' if host is None else f' and {host / 1e9:g} GB of host memory'} under any offload level "
                         f"(one layer on disk still needs {split['device'] / 1e9:.2f} GB on device and "
                         f"{split['host'] / 1e9:.2f} GB on host); raise fit.device_gb / fit.host_gb, or lower "
                         f"micro_batch, or use remat=full")
    return found


def _pipeline_row(cfg: PlanConfig, strategy, mesh: dict, dp: int, base, build_model, precision) -> dict:
    """A pipelined strategy's first-rank figures (`planner_pipeline`) beside the published ones:
    Megatron/ZeRO model states of that rank's layers and Korthikanti's activations of the micro-batches
    the schedule keeps alive there (for 1F1B, p micro-batches of L/p layers: L layers' worth, whatever p)."""
    options = {"schedule": "1f1b", "microbatches": None, "virtual": 1, **cfg.pipeline}
    global_batch = cfg.global_batch or cfg.micro_batch * dp
    microbatches = options["microbatches"] or global_batch // (cfg.micro_batch * dp)
    row = planner_pipeline.plan_pipeline(build_model, base.n_layers, strategy, mesh, cfg.micro_batch, precision,
                                         options["schedule"], microbatches, options["virtual"], cfg.depth, cfg.remat)
    t, sp = planner.model_axes(strategy, {a: n for a, n in mesh.items() if a != strategy.pipeline_axis})
    s, b, h, a = base.seq_len, cfg.micro_batch, base.d_model, base.n_heads
    layer = published.our_layer_bytes(s, b, h, a, t, sp, precision.param_bytes, cfg.remat, base.attention)
    chunk_layers = row["rank_layers"] // row["virtual"]
    row.update({"t": t, "sp": sp, "pipeline": True, "seconds": row["stage_lowering_s"],
                "global_batch": global_batch,
                "korthikanti_layer_bytes": published.korthikanti_layer_bytes(s, b, h, a, t, sp, cfg.remat),
                "our_layer_bytes": layer,
                "activations_formula_bytes": row["chunks_alive_first_rank"] * chunk_layers * layer,
                "activations_all_layers_bytes": base.n_layers * layer})
    return row


def _sequence_row(scheme: str, base, n_tokens: int, p: int, act_bytes: int) -> dict:
    """The published traffic per layer and direction for a long-sequence scheme (`published`)."""
    h = base.d_model
    if scheme == "megatron_sp":
        return {"scheme": scheme, "formula": "4Nh", "formula_bytes": published.megatron_sp_layer_bytes(
            n_tokens, h, act_bytes), "kinds": ["all_gather", "reduce_scatter"]}
    if scheme == "ring":  # k and v reach SDPA expanded to every query head (GQA's repeat precedes it)
        return {"scheme": scheme, "formula": "2(P−1)Nh/P", "formula_bytes": published.ring_layer_bytes(
            n_tokens, h, p, act_bytes), "kinds": ["p2p"]}
    h_kv = getattr(base, "kv_heads", base.n_heads) * (h // base.n_heads)
    return {"scheme": scheme, "formula": "4Nh/P" if h_kv == h else "(2h + 2h_kv)N/P",
            "formula_bytes": published.ulysses_layer_bytes(n_tokens, h, h_kv, p, act_bytes), "kinds": ["all_to_all"]}


def results_file(model_choice: str, root: Path, block: str | None = None) -> Path:
    """docs/results/plan_<model>.json, or for another block its name made a file name."""
    name = (block or doc_block(model_choice)).replace(" model=", "_").replace(" ", "_")
    return root / "docs" / "results" / f"{name}.json"


def doc_block(model_choice: str) -> str:
    """The name of the generated block in docs/plan.md that holds this model's tables."""
    return f"plan model={model_choice}"


@hydra.main(version_base=None, config_path="../conf", config_name="plan")
def main(cfg) -> None:
    cfg: PlanConfig = OmegaConf.to_object(cfg)
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or pipe: keep every column readable
        console = Console(width=180)
    with one_line_errors(), console.status("lowering on fake tensors...") as status:
        result = plan(cfg, progress=lambda row: status.update(
            f"{row['strategy']} done in {row['seconds']} s; lowering the next strategy..."))
    print_tables(result, console)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "plan.json").write_text(json.dumps(result, indent=2, default=str))
    (run_dir / "plan.md").write_text(markdown(result))
    seconds = sum(row["seconds"] for row in result["strategies"])
    console.print(f"lowered {len(result['strategies'])} strategies in {seconds:.0f} s; "
                  f"wrote {run_dir / 'plan.json'} and {run_dir / 'plan.md'}")
    if cfg.write_readme:
        root, model = Path(hydra.utils.get_original_cwd()), HydraConfig.get().runtime.choices["model"]
        block = cfg.doc_block or doc_block(model)
        results = results_file(model, root, block)  # what the block is rendered from: tests/test_docs.py checks it
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(result, indent=1, default=str) + "\n")
        console.print(f"wrote {results} and {write_block(block, markdown(result), root)}")


if __name__ == "__main__":
    main()
