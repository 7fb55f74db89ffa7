"""`python -m experiments.compare`: every run on the same model, data and seed; same loss or a loud failure.

A *run* is a strategy plus policy overrides of the train config (`precision`, `reduce_dtype`,
`grad_accum`, or any other `experiments.config.Config` key that is not the shared setup), e.g.
`{name: zero3_bf16, strategy: zero3, precision: bf16}`; a bare strategy name is a run without a
policy. Each run trains on its strategy's example mesh into `<run dir>/<run>/` with
`experiments.trainer` (the loop of `experiments.train`); runs whose meshes have the same number
of ranks run one after another in the same spawned gloo ranks (starting processes costs more
than a tiny model's steps). The reference of a run is a single-process run without the compiler
under the same numerical policy (`REFERENCE_POLICY`: it casts and accumulates identically),
computed once per distinct policy. Every run's per-step loss must match its reference within a
tolerance set by the compute dtype (else: non-zero exit naming the run and the step). Then
`report.md` and its PNGs (loss curves, peak memory per rank measured vs predicted, bytes per
collective kind, step time) are written into the Hydra run dir (`experiments.report`).
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("experiments.compare")

import dataclasses
import math
import pathlib
from typing import Any, Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments import config as _config
from experiments import offload_report, report, train, trainer
from experiments.builders import (DTYPES, build_model, build_optimizer, build_schedule, build_strategy, describe_mesh,
                                  mesh_shape, micro_batches, validate)
from experiments.cli import one_line_errors
from experiments.metrics import read_metrics
from experiments.docs import blocks, write_block
from functional_parallel import data, launch
from functional_parallel import config_dirs
from functional_parallel.parallel import available_strategies
from functional_parallel.precision import Precision, init_state
from functional_parallel.train import make_train_step

# Relative tolerance on the per-step loss against the reference, by compute dtype: float64 is the
# exactness check; float32 allows reduction-order noise growing over the steps. Under bf16/fp16 the
# loss itself is a low-precision number (one rounding flip is a relative difference of up to one
# epsilon) and each rank rounds its partial gradient sums to the compute dtype before they are
# reduced (the reference sums once), which AdamW turns into small parameter differences: 4 epsilons.
# Measured on the default compare (20 steps): zero3 bf16 1.2e-2 (1.5 eps), tp_sp bf16 7.6e-3; zero3 fp16 1.0e-3.
TOLERANCES = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 4 * torch.finfo(torch.bfloat16).eps,
              "float16": 4 * torch.finfo(torch.float16).eps}
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # precision=fp32 computes in model.dtype
# The train-config keys that change the single-process reference's numbers (what
# `reference_losses` passes to `make_train_step`); runs that agree on them share one reference. Keys
# that change where values live, not what they are (the mesh, and memory policies), are left out.
REFERENCE_POLICY = ("precision", "reduce_dtype", "grad_accum")
# Keys every run shares (or that compare sets itself): a run may not override them.
SHARED_KEYS = ("model", "optim", "data", "steps", "seed", "log_every", "eval_every", "eval_batches", "progress",
               "timeout_s")


@dataclasses.dataclass
class CompareConfig:
    """What is compared (`runs`, each on `meshes[its strategy]`, else the strategy's `example_mesh`)
    and the one training setup they share.

    `runs` entries: a strategy name, or {name, strategy (default: name), <train-config key>: value, ...}.
    `strategies` (when set) replaces `runs` by one plain run per strategy.
    """

    model: _config.ModelConfig = dataclasses.field(default_factory=_config.ModelConfig)
    optim: _config.OptimConfig = dataclasses.field(default_factory=_config.OptimConfig)
    data: _config.DataConfig = dataclasses.field(default_factory=_config.DataConfig)
    runs: List[Any] = dataclasses.field(default_factory=available_strategies)
    strategies: Optional[List[str]] = None
    meshes: Dict[str, Any] = dataclasses.field(default_factory=dict)  # strategy -> mesh; default: its example_mesh
    steps: int = 20
    seed: int = 0
    rtol: Optional[float] = None  # null: TOLERANCES[compute dtype] per run
    eval_batches: int = 0  # validation loss per run (0: none; the equivalence check uses train losses)
    timeout_s: float = 300.0
    write_readme: bool = False  # also write the short report, results and plots into docs/ (docs/compare.md)
    doc_block: str = "compare"  # the generated block write_readme rewrites, and its results' and plots' file prefix


ConfigStore.instance().store(name="base_compare", node=CompareConfig)
DOC_BLOCK = "compare"  # docs/compare.md (experiments.docs)


class NotEquivalentError(AssertionError):
    """A run's loss curve left its reference's."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of the comparison: a strategy and the train-config overrides (its policy)."""

    name: str
    strategy: str
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """`zero3` or `zero3, precision=bf16, grad_accum=2`."""
        return ", ".join([self.strategy] + [f"{key}={value}" for key, value in self.overrides.items()])


def parse_runs(cfg: DictConfig) -> list[Run]:
    """The configured runs (`strategies`, when set, else `runs`); a clear error for a malformed entry."""
    entries = cfg.strategies if cfg.get("strategies") is not None else cfg.runs
    runs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            runs.append(Run(entry, entry))
            continue
        if not OmegaConf.is_dict(entry) or not entry.get("name"):
            raise ValueError(f"runs[{index}] = {entry!r}: expected a strategy name or a mapping "
                             f"{{name: .., strategy: .., <train-config key>: ..}} with a name")
        fields = OmegaConf.to_container(entry, resolve=True)
        name = fields.pop("name")
        strategy = fields.pop("strategy", name)
        shared = sorted(set(fields) & set(SHARED_KEYS))
        if shared:
            raise ValueError(f"run {name!r} overrides {shared}: every run shares the model, optimizer, data, steps "
                             f"and seed (set them at the top level of the compare config)")
        runs.append(Run(name, strategy, fields))
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"run names must be unique (they name the run dirs); repeated: {duplicates}")
    return runs


def train_config(cfg: DictConfig, run: Run | str) -> DictConfig:
    """The `experiments.train` config of one run: the shared setup, its strategy and mesh, its overrides."""
    run = Run(run, run) if isinstance(run, str) else run
    if run.strategy not in available_strategies():
        raise ValueError(f"unknown strategy {run.strategy!r} in run {run.name!r}; expected some of "
                         f"{available_strategies()}")
    strategy = config_dirs.load("strategy", run.strategy)
    overrides = dict(run.overrides)
    mesh = overrides.pop("mesh", None) or cfg.meshes.get(run.strategy) or strategy.get("example_mesh")
    if not mesh:
        raise ValueError(f"no mesh for strategy {run.strategy!r}: give it an example_mesh, or set "
                         f"meshes.{run.strategy}={{dp: .., tp: ..}}")
    shared = OmegaConf.merge(OmegaConf.structured(_config.Config), {
        "model": cfg.model, "optim": cfg.optim, "data": cfg.data, "strategy": strategy,
        "mesh": mesh_shape(mesh), "steps": cfg.steps, "seed": cfg.seed, "log_every": 1,
        "eval_every": cfg.steps, "eval_batches": cfg.eval_batches, "progress": False, "timeout_s": cfg.timeout_s})
    try:
        return OmegaConf.merge(shared, overrides)
    except OmegaConfBaseException as error:
        raise ValueError(f"run {run.name!r}: {run.overrides} is not a valid train-config override "
                         f"(experiments.config.Config): {error}") from None


def reference_policy(train_cfg: DictConfig) -> tuple:
    """The (key, value) pairs of `REFERENCE_POLICY` in a run's train config: its reference's identity
    (a pipelined strategy's micro-batches are `pipeline.microbatches`)."""
    values = {key: train_cfg[key] for key in REFERENCE_POLICY}
    values["grad_accum"] = micro_batches(train_cfg, build_strategy(train_cfg.strategy))
    return tuple(values.items())


def tolerance(cfg: DictConfig, train_cfg: DictConfig) -> float:
    """`cfg.rtol`, else the tolerance of the run's compute dtype (the model's dtype under fp32)."""
    if cfg.rtol is not None:
        return cfg.rtol
    return TOLERANCES[COMPUTE_DTYPES.get(train_cfg.precision, cfg.model.dtype)]


def reference_losses(cfg: DictConfig, policy: tuple = ()) -> list[float]:
    """Per-step losses of the plain single-process step (no compiler, no collectives) under `policy`
    (`reference_policy` pairs; absent keys take the train config's defaults)."""
    policy = dict(policy)
    defaults = _config.Config()
    precision = Precision.named(policy.get("precision", defaults.precision),
                                policy.get("reduce_dtype", defaults.reduce_dtype))
    dataset = data.load_dataset(cfg.data.name, cfg.data.val_fraction)
    model = build_model(cfg.model, dataset.vocab_size)
    optimizer = build_optimizer(cfg.optim, build_schedule(cfg.optim, cfg.steps))
    params = model.init(cfg.seed, DTYPES[cfg.model.dtype])
    params, opt_state = init_state(optimizer, params, precision)
    step = make_train_step(model.loss, optimizer, policy.get("grad_accum", defaults.grad_accum), precision)
    losses = []
    for index in range(cfg.steps):
        batch = dataset.get_batch("train", index, cfg.data.global_batch, model.cfg.seq_len, cfg.seed)
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(metrics["loss"].item())
    return losses


def check_equivalent(run: str, losses: list[float], reference: list[float], rtol: float) -> float:
    """The largest relative difference to the reference; raises naming the run and the first step beyond `rtol`."""
    if len(losses) != len(reference):
        raise NotEquivalentError(f"run {run!r}: {len(losses)} losses logged, the reference has {len(reference)}")
    worst = 0.0
    for step, (loss, expected) in enumerate(zip(losses, reference), start=1):
        difference = abs(loss - expected) / max(abs(expected), 1e-12)
        if not difference <= rtol:  # also catches NaN
            raise NotEquivalentError(f"run {run!r} diverges from the single-process reference under the same policy "
                                     f"at step {step}: loss {loss!r} vs {expected!r} (relative difference "
                                     f"{difference:.3g} > rtol {rtol:g})")
        worst = max(worst, difference)
    return worst


def _train_in_turn(rank: int, world_size: int, runs: list[tuple[str, dict]], output_dir: str) -> dict:
    """On one spawned rank: train each (run name, resolved config) in order; rank 0 returns the summaries."""
    summaries = {}
    for index, (name, resolved) in enumerate(runs, start=1):
        run_dir = pathlib.Path(output_dir) / name if rank == 0 else None
        summaries[name] = trainer.train(train.config_from_dict(resolved), rank, torch.device("cpu"), run_dir)
        if rank == 0:  # as each run finishes, not all at the end
            summary = summaries[name]
            print(f"  {name} trained ({index}/{len(runs)} on {world_size} ranks): final loss "
                  f"{summary['final_loss']:.6f} in {summary['seconds']:.1f} s", flush=True)
    return summaries


def run_all(configs: dict[str, DictConfig], output_dir: pathlib.Path, timeout_s: float) -> dict[str, dict]:
    """Train every run; one set of spawned ranks per world size. Returns rank 0's summaries."""
    by_world: dict[int, list] = {}
    for name, train_cfg in configs.items():
        train.write_config(train_cfg, output_dir / name)
        by_world.setdefault(math.prod(mesh_shape(train_cfg.mesh).values()), []).append(
            (name, OmegaConf.to_container(train_cfg, resolve=True)))
    summaries = {}
    print(f"compare: training the runs in {len(by_world)} set(s) of spawned ranks; run dir {output_dir}", flush=True)
    for world_size, runs in by_world.items():
        summaries.update(launch.spawn(_train_in_turn, world_size, runs, str(output_dir), timeout_s=timeout_s,
                                      rendezvous_file=str(output_dir / train.RENDEZVOUS_FILE), backend="gloo")[0])
    return {name: summaries[name] for name in configs}


def policy_keys(runs: list[Run]) -> list[str]:
    """The train-config keys any run overrides, in order of first appearance (the report's policy columns)."""
    return list(dict.fromkeys(key for run in runs for key in run.overrides if key != "mesh"))


def check_runs(cfg: DictConfig, summaries: dict[str, dict], references: dict[str, list[float]],
               configs: dict[str, DictConfig]) -> list[str]:
    """Check every run against its reference; record losses, tolerance and the worst difference in
    its summary. Returns the failures' messages."""
    failures = []
    for name, summary in summaries.items():
        train_cfg = configs[name]
        summary["rtol"] = tolerance(cfg, train_cfg)
        try:
            summary["max_rel_diff"] = check_equivalent(name, summary["losses"], references[name], summary["rtol"])
        except NotEquivalentError as error:
            summary["max_rel_diff"], summary["error"] = None, str(error)
            failures.append(str(error))
        print(f"{name:12s} mesh {describe_mesh(mesh_shape(train_cfg.mesh))}  final loss {summary['final_loss']:.6f}  "
              f"max rel diff {summary['max_rel_diff']} (rtol {summary['rtol']:g})  "
              f"step {1e3 * summary['step_time_s']:.1f} ms", flush=True)
    return failures


def compare(cfg: DictConfig, output_dir: str | pathlib.Path) -> dict:
    """Run, check and report. Returns {"results": per-run summaries, "references": per-run reference losses}."""
    output_dir = pathlib.Path(output_dir)
    runs = parse_runs(cfg)
    configs = {run.name: train_config(cfg, run) for run in runs}  # every config error before any run
    for name, train_cfg in configs.items():
        train.default_offload_dir(train_cfg, output_dir / name)
        validate(train_cfg)
    policies = list(dict.fromkeys(reference_policy(c) for c in configs.values()))
    print(f"compare: {len(runs)} runs ({', '.join(configs)}); first {len(policies)} single-process "
          f"reference(s), one per policy", flush=True)
    by_policy = {policy: reference_losses(cfg, policy) for policy in policies}  # once per distinct policy
    references = {name: by_policy[reference_policy(c)] for name, c in configs.items()}
    summaries = run_all(configs, output_dir, cfg.timeout_s)
    columns = policy_keys(runs)
    for run in runs:
        summary = summaries[run.name]
        summary["losses"] = [r["loss"] for r in read_metrics(output_dir / run.name / "metrics.jsonl")]
        summary["policy"] = {key: OmegaConf.select(configs[run.name], key) for key in columns}
        summary["overrides"] = dict(run.overrides)
        summary["reference_losses"] = references[run.name]
        summary["reference_policy"] = dict(reference_policy(configs[run.name]))
    failures = check_runs(cfg, summaries, references, configs)
    report.write(output_dir, OmegaConf.to_container(cfg, resolve=True), summaries)
    if failures:
        raise NotEquivalentError("loss curves are not equivalent:\n" + "\n".join(failures))
    return {"results": summaries, "references": references}


@hydra.main(version_base=None, config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    output_dir = HydraConfig.get().runtime.output_dir
    with one_line_errors():
        outcome = compare(cfg, output_dir)
    print(f"equivalent; report: {pathlib.Path(output_dir) / 'report.md'}")
    if cfg.write_readme:
        root = pathlib.Path(hydra.utils.get_original_cwd())
        for path in report.publish(outcome["results"], pathlib.Path(output_dir), root / "docs", cfg.doc_block):
            print(f"wrote {path}")
        print(f"wrote {write_block(cfg.doc_block, report.readme_block(outcome['results']), root)}")
        summary = f"{cfg.doc_block}_summary"  # a block's short form, where the docs have one (README)
        if summary in blocks(root):
            print(f"wrote {write_block(summary, offload_report.summary_block(outcome['results']), root)}")


if __name__ == "__main__":
    main()
