"""`python -m experiments.compare`: every strategy on the same model, data and seed; same loss or a loud failure.

Each strategy trains on its example mesh into `<run dir>/<strategy>/` with `experiments.trainer`
(the loop of `experiments.train`); strategies whose meshes have the same number of ranks run one
after another in the same spawned gloo ranks (starting processes costs more than a tiny model's
steps). A single-process run without the compiler is the reference.
Every strategy's per-step loss must match the reference within a tolerance set by the dtype
(else: non-zero exit naming the strategy and the step). Then `report.md` and its PNGs (loss
curves, peak memory per rank measured vs predicted, bytes per collective kind, step time)
are written into the Hydra run dir (`experiments.report`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments import config as _config
from experiments import report, train, trainer
from experiments.builders import DTYPES, build_model, build_optimizer, build_schedule, validate
from experiments.metrics import read_metrics
from functional_parallel import data, launch
from functional_parallel.parallel import EXAMPLE_MESHES, STRATEGY_DIR
from functional_parallel.train import make_train_step

# Relative tolerance on the per-step loss against the reference, by parameter dtype: float64 is
# the exactness check; float32 allows reduction-order noise growing over the steps.
TOLERANCES = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 5e-2}


@dataclasses.dataclass
class CompareConfig:
    """What is compared (`strategies`, each on `meshes[strategy]`) and the one training setup they share."""

    model: _config.ModelConfig = dataclasses.field(default_factory=_config.ModelConfig)
    optim: _config.OptimConfig = dataclasses.field(default_factory=_config.OptimConfig)
    data: _config.DataConfig = dataclasses.field(default_factory=_config.DataConfig)
    strategies: List[str] = dataclasses.field(default_factory=lambda: list(EXAMPLE_MESHES))
    meshes: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=lambda: dict(EXAMPLE_MESHES))
    steps: int = 20
    seed: int = 0
    rtol: Optional[float] = None  # null: TOLERANCES[model.dtype]
    eval_batches: int = 0  # validation loss per strategy (0: none; the equivalence check uses train losses)
    timeout_s: float = 300.0


ConfigStore.instance().store(name="base_compare", node=CompareConfig)


class NotEquivalentError(AssertionError):
    """A strategy's loss curve left the reference's."""


def train_config(cfg: DictConfig, strategy: str) -> DictConfig:
    """The `experiments.train` config of one strategy's run: the shared setup, its strategy and mesh."""
    path = STRATEGY_DIR / f"{strategy}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))
        raise ValueError(f"unknown strategy {strategy!r} in strategies; expected some of {known}")
    if strategy not in cfg.meshes:
        raise ValueError(f"no mesh for strategy {strategy!r}: add meshes.{strategy}={{dp: .., tp: ..}}")
    return OmegaConf.merge(OmegaConf.structured(_config.Config), {
        "model": cfg.model, "optim": cfg.optim, "data": cfg.data, "strategy": OmegaConf.load(path),
        "mesh": cfg.meshes[strategy], "steps": cfg.steps, "seed": cfg.seed, "log_every": 1,
        "eval_every": cfg.steps, "eval_batches": cfg.eval_batches, "progress": False, "timeout_s": cfg.timeout_s})


def reference_losses(cfg: DictConfig) -> list[float]:
    """Per-step losses of the plain single-process step (no compiler, no collectives)."""
    dataset = data.load_dataset(cfg.data.name, cfg.data.val_fraction)
    model = build_model(cfg.model, dataset.vocab_size)
    optimizer = build_optimizer(cfg.optim, build_schedule(cfg.optim, cfg.steps))
    params = model.init(cfg.seed, DTYPES[cfg.model.dtype])
    opt_state, step = optimizer.init(params), make_train_step(model.loss, optimizer)
    losses = []
    for index in range(cfg.steps):
        batch = dataset.get_batch("train", index, cfg.data.global_batch, model.cfg.seq_len, cfg.seed)
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(metrics["loss"].item())
    return losses


def check_equivalent(strategy: str, losses: list[float], reference: list[float], rtol: float) -> float:
    """The largest relative difference to the reference; raises naming the first step beyond `rtol`."""
    if len(losses) != len(reference):
        raise NotEquivalentError(f"{strategy}: {len(losses)} losses logged, the reference has {len(reference)}")
    worst = 0.0
    for step, (loss, expected) in enumerate(zip(losses, reference), start=1):
        difference = abs(loss - expected) / max(abs(expected), 1e-12)
        if not difference <= rtol:  # also catches NaN
            raise NotEquivalentError(f"strategy {strategy!r} diverges from the single-process reference at step "
                                     f"{step}: loss {loss!r} vs {expected!r} (relative difference {difference:.3g} "
                                     f"> rtol {rtol:g})")
        worst = max(worst, difference)
    return worst


def _train_in_turn(rank: int, world_size: int, runs: list[tuple[str, dict]], output_dir: str) -> dict:
    """On one spawned rank: train each (strategy, resolved config) in order; rank 0 returns the summaries."""
    summaries = {}
    for name, resolved in runs:
        run_dir = pathlib.Path(output_dir) / name if rank == 0 else None
        summaries[name] = trainer.train(train.config_from_dict(resolved), rank, torch.device("cpu"), run_dir)
    return summaries


def run_strategies(configs: dict[str, DictConfig], output_dir: pathlib.Path, timeout_s: float) -> dict[str, dict]:
    """Train every strategy; one set of spawned ranks per world size. Returns rank 0's summaries."""
    by_world: dict[int, list] = {}
    for name, train_cfg in configs.items():
        train.write_config(train_cfg, output_dir / name)
        by_world.setdefault(train_cfg.mesh.dp * train_cfg.mesh.tp, []).append(
            (name, OmegaConf.to_container(train_cfg, resolve=True)))
    summaries = {}
    for world_size, runs in by_world.items():
        summaries.update(launch.spawn(_train_in_turn, world_size, runs, str(output_dir), timeout_s=timeout_s,
                                      rendezvous_file=str(output_dir / train.RENDEZVOUS_FILE), backend="gloo")[0])
    return {name: summaries[name] for name in configs}


def compare(cfg: DictConfig, output_dir: str | pathlib.Path) -> dict:
    """Run, check and report. Returns {"results": per-strategy summaries, "reference": losses}."""
    output_dir = pathlib.Path(output_dir)
    configs = {name: train_config(cfg, name) for name in cfg.strategies}  # every config error before any run
    for train_cfg in configs.values():
        validate(train_cfg)
    rtol = cfg.rtol if cfg.rtol is not None else TOLERANCES[cfg.model.dtype]
    reference = reference_losses(cfg)
    results, failures = {}, []
    for name, summary in run_strategies(configs, output_dir, cfg.timeout_s).items():
        train_cfg = configs[name]
        summary["losses"] = [r["loss"] for r in read_metrics(output_dir / name / "metrics.jsonl")]
        try:
            summary["max_rel_diff"] = check_equivalent(name, summary["losses"], reference, rtol)
        except NotEquivalentError as error:
            summary["max_rel_diff"], summary["error"] = None, str(error)
            failures.append(str(error))
        results[name] = summary
        print(f"{name:8s} mesh {train_cfg.mesh.dp}x{train_cfg.mesh.tp}  final loss {summary['final_loss']:.6f}  "
              f"max rel diff {summary['max_rel_diff']}  step {1e3 * summary['step_time_s']:.1f} ms", flush=True)
    report.write(output_dir, OmegaConf.to_container(cfg, resolve=True), results, reference, rtol)
    if failures:
        raise NotEquivalentError("loss curves are not equivalent:\n" + "\n".join(failures))
    return {"results": results, "reference": reference}


@hydra.main(version_base=None, config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    output_dir = HydraConfig.get().runtime.output_dir
    compare(cfg, output_dir)
    print(f"equivalent; report: {pathlib.Path(output_dir) / 'report.md'}")


if __name__ == "__main__":
    main()
