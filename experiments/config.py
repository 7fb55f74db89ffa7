"""Structured configs (dataclasses) registered in Hydra's ConfigStore.

`conf/config.yaml` starts from `base_config`, so every group file and every command-line
override is checked against these dataclasses: a typo such as `optim.lr_rate=1` fails with
Hydra's own error instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclasses.dataclass
class ModelConfig:
    """A named size of an architecture; the other fields override it when not null.

    `vocab_size` always comes from the data's tokenizer.
    """

    arch: str = "gpt"  # gpt | llama
    size: str = "small"  # tiny | small | gpt2_124m | gpt3_175b | llama2_7b | llama2_70b
    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    seq_len: Optional[int] = None
    fused_qkv: Optional[bool] = None  # gpt only
    n_kv_heads: Optional[int] = None  # llama only
    dtype: str = "float32"  # float32 | float64 | bfloat16


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
class Config:
    """The whole experiment."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    steps: int = 300
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    threads: Optional[int] = None  # torch intra-op threads; null keeps torch's default
    progress: bool = True  # rich progress bar


def register() -> None:
    """Put the schemas in the ConfigStore (idempotent; called on import)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    store.store(group="model", name="base_model", node=ModelConfig)
    store.store(group="optim", name="base_optim", node=OptimConfig)
    store.store(group="data", name="base_data", node=DataConfig)


register()
