"""`python -m experiments.train`: train a model under a parallel strategy on a mesh of ranks.

Locally it spawns one gloo rank per mesh position (the product of the mesh's sizes) on this
machine; under torchrun (RANK, WORLD_SIZE, MASTER_ADDR set) this process is one rank of the real
job (NCCL and its GPU when CUDA is present). Hydra runs once, in the launching process: the ranks receive the resolved
config, meet through a file in the run dir (parallel sweeps never share one), and only rank 0
writes the run dir: `config.yaml`, `metrics.jsonl`, TensorBoard events (`tb/`), `loss.png`,
`summary.json`. `run(cfg, output_dir)` does the work without Hydra's entry point (tests call it).
"""
from __future__ import annotations

if __name__ == "__main__":  # a status line before the imports below (seconds on a cold start)
    from experiments.starting import starting

    starting("experiments.train")

import contextlib
import json
import logging
import math
import pathlib
import shutil
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments import checkpointing, trainer
from experiments import config as _config
from experiments.builders import describe_mesh, mesh_shape, validate
from experiments.cli import one_line_errors
from functional_parallel import launch

log = logging.getLogger("experiments.train")  # Hydra sends it to the console and to <run dir>/train.log
RENDEZVOUS_FILE = ".rendezvous"  # in the run dir: one per job, so concurrent jobs never meet each other


def config_from_dict(resolved: dict) -> DictConfig:
    """A resolved config (plain dict, as sent to spawned ranks) back under the structured schema."""
    return OmegaConf.merge(OmegaConf.structured(_config.Config), resolved)


def _spawned_rank(rank: int, world_size: int, resolved: dict, output_dir: str) -> dict:
    cfg = config_from_dict(resolved)
    return trainer.train(cfg, rank, torch.device("cpu"), pathlib.Path(output_dir) if rank == 0 else None)


def check_known_keys(cfg: DictConfig) -> None:
    """Every key is one the ranks know (`experiments.config.Config`): `+stepz=10` fails here, before spawning."""
    try:
        config_from_dict(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or str(error).splitlines()[0]
        raise ValueError(f"unknown config key {key!r} (added with +): the train config has no such field; "
                         f"see experiments/config.py (Config) for the keys there are") from None


def default_offload_dir(cfg: DictConfig, output_dir: pathlib.Path) -> None:
    """`offload=disk` without `offload_dir`: `<run dir>/offload`, set before any rank starts (all ranks agree)."""
    if cfg.offload == "disk" and not cfg.offload_dir:
        cfg.offload_dir = str(output_dir / "offload")


def write_config(cfg: DictConfig, output_dir: pathlib.Path) -> None:
    """The resolved config into the run dir (rank 0 / the launching process only)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)


def run_spawned(cfg: DictConfig, output_dir: pathlib.Path) -> dict:
    """Spawn the mesh's ranks on this machine (gloo) and return rank 0's summary."""
    validate(cfg)  # bad strategy / mesh / batch: a clear error before any process starts
    write_config(cfg, output_dir)
    world_size = math.prod(mesh_shape(cfg.mesh).values())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    results = launch.spawn(_spawned_rank, world_size, resolved, str(output_dir), timeout_s=cfg.timeout_s,
                           rendezvous_file=str(output_dir / RENDEZVOUS_FILE), backend="gloo")
    return results[0]


def run_torchrun_rank(cfg: DictConfig, output_dir: pathlib.Path) -> dict:
    """This process is one rank of a torchrun job; rank 0 writes the run dir and returns the summary."""
    validate(cfg)  # before joining the job; the world size is checked in `trainer.setup`
    rank, world_size, device = launch.init_from_env(cfg.timeout_s)
    try:
        if rank == 0:
            write_config(cfg, output_dir)
        return trainer.train(cfg, rank, device, output_dir if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def run(cfg: DictConfig, output_dir: str | pathlib.Path) -> dict[str, Any]:
    """Train as configured (spawned ranks, or this torchrun rank); return rank 0's summary."""
    output_dir = pathlib.Path(output_dir)
    check_known_keys(cfg)
    cfg.mesh = mesh_shape(cfg.mesh)  # a conf/meshes name becomes its sizes here, where Hydra's search path is known
    cfg = checkpointing.prepare(cfg, output_dir, torchrun=launch.launched_by_torchrun())
    default_offload_dir(cfg, output_dir)
    if launch.launched_by_torchrun():
        return run_torchrun_rank(cfg, output_dir)
    return run_spawned(cfg, output_dir)


HYDRA_ONLY = {".hydra", "train.log"}  # what is in a run dir before the job writes its own (config.yaml first)


@contextlib.contextmanager
def removing_if_nothing_written(output_dir: str):
    """A run that fails before writing anything of its own (a config error) leaves no run dir behind."""
    try:
        yield
    except BaseException:
        run_dir = pathlib.Path(output_dir)
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_ONLY:
            shutil.rmtree(run_dir / ".hydra", ignore_errors=True)  # only Hydra's own files go
            (run_dir / "train.log").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def headline(summary: dict) -> dict:
    """The few numbers printed at the end of a run."""
    keys = ("strategy", "mesh", "first_loss", "final_loss", "val_loss", "step_time_s", "tokens_per_s", "seconds")
    return {key: round(summary[key], 4) if isinstance(summary.get(key), float) else summary.get(key) for key in keys}


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Hydra entry point: run in Hydra's output dir, print the headline, return the summary (for callbacks)."""
    output_dir = HydraConfig.get().runtime.output_dir
    with one_line_errors(), removing_if_nothing_written(output_dir):
        log.info(f"train: {cfg.strategy.name} on mesh {describe_mesh(mesh_shape(cfg.mesh))}; run dir {output_dir}")
        summary = run(cfg, output_dir)
    if summary:
        log.info(json.dumps(headline(summary)))
        log.info(f"wrote {output_dir}: summary.json, metrics.jsonl, loss.png, tb/, config.yaml, train.log")
    elif pathlib.Path(output_dir).name.startswith(_config.PRIVATE_DIR_PREFIX):
        shutil.rmtree(output_dir, ignore_errors=True)  # a torchrun rank other than 0: its private dir
    return summary


if __name__ == "__main__":
    main()
