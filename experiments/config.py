"""Structured configs (dataclasses) registered in Hydra's ConfigStore.

`conf/config.yaml` starts from `base_config`, so every group file and every command-line
override is checked against these dataclasses: a typo such as `optim.lr_rate=1` fails with
Hydra's own error instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from functional_parallel.parallel import StrategyConfig  # the one strategy schema (also read without Hydra)


@dataclasses.dataclass
class ModelConfig:
    """A named size of an architecture; the other fields override it when not null.

    `vocab_size` always comes from the data's tokenizer.
    """

    arch: str = "gpt"  # gpt | llama | hf (a Hugging Face causal LM built from `hf`, no weights downloaded)
    size: str = "small"  # tiny | small | gpt2_124m | gpt3_175b | llama2_7b | llama2_70b
    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    seq_len: Optional[int] = None
    fused_qkv: Optional[bool] = None  # gpt only
    attention: Optional[str] = None  # gpt only: sdpa (default) | math (the s² scores written out)
    n_kv_heads: Optional[int] = None  # llama only
    dtype: str = "float32"  # float32 | float64 | bfloat16
    # The tokenizer's vocabulary is padded up to a multiple of this (Megatron's
    # make-vocab-size-divisible-by) so embedding rows split evenly over dp and tp ranks.
    vocab_multiple: int = 64
    # arch=hf: the transformers config (`model_type` and its fields; vocab and positions are set
    # from the data and seq_len), and its tensor-parallel plan when the model ships none
    # (module path with * -> colwise | rowwise | packed_colwise:<n> | embedding_rowwise).
    hf: Optional[Dict[str, Any]] = None
    tp_plan: Optional[Dict[str, str]] = None
    # arch=hf: train with the module's dropout on (its *_pdrop / *_dropout config fields; validation
    # without). Off by default: then every strategy equals the single-process reference exactly.
    dropout: bool = False


@dataclasses.dataclass
class OptimConfig:
    """Optimizer, warmup + cosine schedule, and global-norm clipping."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # adamw: decoupled, matrices only; sgd: L2 on every leaf
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    clip_norm: Optional[float] = 1.0  # null: no clipping


@dataclasses.dataclass
class DataConfig:
    """Corpus and batch; the sequence length is the model's."""

    name: str = "pydoc"  # pydoc | shakespeare
    val_fraction: float = 0.1
    global_batch: int = 32


@dataclasses.dataclass
class PipelineConfig:
    """Pipeline parallelism, read under a strategy with a `pipeline` (pp, dp_tp_pp, zero1_tp_pp, zero3_pp)."""

    microbatches: int = 4  # per optimizer step: the step's gradient accumulation, scheduled over the stages
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zb_h1
    virtual: int = 1  # model chunks per rank (interleaved_1f1b; the stage count is pp x virtual)


@dataclasses.dataclass
class Config:
    """The whole experiment."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    # The device mesh: axis name -> size, in order (the last axis varies fastest over ranks); the
    # world size is their product. A `conf/meshes/` file, or `mesh='{dp: 2, tp: 2}'` on the command line.
    mesh: Any = "dp2"
    steps: int = 300
    seed: int = 0
    grad_accum: int = 1  # micro-batches per step: one update from their mean gradient, reduced once per step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: dynamic loss scaling); masters and optimizer state stay fp32
    reduce_dtype: Optional[str] = None  # gradient reductions: null (the compute dtype) | float32
    remat: str = "none"  # activation checkpointing: none | selective (attention core) | full (keep layer inputs)
    offload: str = "none"  # none | optimizer (state + its update on host: ZeRO-Offload) | params (also params) | disk
    offload_dir: Optional[str] = None  # offload=disk: where the files live (null: <run dir>/offload)
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4  # 0: no validation
    threads: Optional[int] = None  # torch intra-op threads; null keeps torch's default
    progress: bool = True  # rich progress bar (rank 0)
    timeout_s: float = 300.0  # a collective that waits longer than this fails instead of hanging
    # Checkpoints and failures (experiments/checkpointing.py; docs/errors.md).
    checkpoint_every: int = 0  # save every N steps and at the run's last step; 0: never
    checkpoint_dir: Optional[str] = None  # null: <run dir>/checkpoints (under torchrun: set it, shared by all ranks)
    resume: bool = False  # continue from the latest complete checkpoint in checkpoint_dir
    stop_after: Optional[int] = None  # end this run after this many steps in all; the schedule still spans `steps`
    nonfinite: str = "stop"  # stop | skip: what an inf/nan loss or gradient norm does
    max_skips: int = 3  # nonfinite=skip: skipped steps in a row before stopping anyway


# The rows of the project's tables (strategies, plan) and of its strategy tests, in reading order:
# the project's own strategy files; any other file is listed with `strategies=[..]`. The table
# strategies share dp x tp meshes; the sequence strategies need a sequence axis (sp) instead.
TABLE_STRATEGIES = ["dp", "zero1", "zero2", "zero3", "tp", "tp_sp", "fsdp_tp"]
SEQUENCE_STRATEGIES = ["ulysses", "ulysses_zero3", "ring", "tp_cp"]

PRIVATE_DIR_PREFIX = "functional-parallel-rank"


def rank_zero_dir(path: str) -> str:
    """`${rank_zero_dir:outputs/...}` in `hydra.run.dir`: the run dir on rank 0 of a torchrun job.

    Every torchrun process runs Hydra; ranks other than 0 get a private temp dir instead, so
    only rank 0 writes the run dir (outside torchrun RANK is unset and this is `path`).
    """
    rank = int(os.environ.get("RANK", "0"))
    return path if rank == 0 else os.path.join(tempfile.gettempdir(), f"{PRIVATE_DIR_PREFIX}{rank}-{os.getpid()}")


def rank_zero_only(value: Any) -> Any:
    """`${rank_zero_only:.hydra}` in `hydra.output_subdir`: the value on rank 0, null (nothing written) elsewhere."""
    return value if int(os.environ.get("RANK", "0")) == 0 else None


def register() -> None:
    """Put the schemas in the ConfigStore and the resolver in OmegaConf (idempotent; called on import)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    # The group schemas are the typed fields of `Config` (and of the compare and plan configs), so
    # no schema is stored as a group option: `model=`, `optim=`, `strategy=` offer only real files.
    OmegaConf.register_new_resolver("rank_zero_dir", rank_zero_dir, replace=True)
    OmegaConf.register_new_resolver("rank_zero_only", rank_zero_only, replace=True)


register()
