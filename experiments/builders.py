"""From config nodes to objects: model, schedule, optimizer, strategy, mesh shape; and the checks
that must fail before any process is spawned."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from functional_parallel import data, models, optim
from functional_parallel.parallel import Strategy, check_offload, param_specs, state_specs
from functional_parallel.precision import Precision
from functional_parallel.train import check_local_batch
from sharding import Mesh, P, shard
from sharding.remat import check_policy

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_model(model_cfg: Any, vocab_size: int) -> models.Model:
    """The configured architecture and size, with the tokenizer's vocabulary padded to `vocab_multiple`."""
    overrides = {key: model_cfg.get(key) for key in ("d_model", "n_layers", "n_heads", "seq_len",
                                                      "fused_qkv", "n_kv_heads", "attention")}
    vocab_size = models.padded_vocab(vocab_size, model_cfg.vocab_multiple)
    return models.build(model_cfg.arch, model_cfg.size, vocab_size=vocab_size,
                        **overrides)


def build_schedule(optim_cfg: Any, steps: int) -> optim.Schedule:
    """Warmup to `lr`, cosine down to `lr * min_lr_ratio` at the last step."""
    warmup = min(optim_cfg.warmup_steps, max(steps - 1, 0))
    return optim.warmup_cosine_schedule(optim_cfg.lr, warmup, max(steps, warmup + 1),
                                        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def build_optimizer(optim_cfg: Any, schedule: optim.Schedule) -> optim.GradientTransformation:
    """Clipping (optional) followed by AdamW or SGD."""
    if optim_cfg.name == "adamw":
        inner = optim.adamw(schedule, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps,
                            optim_cfg.weight_decay, mask=optim.matrices_only)
    elif optim_cfg.name == "sgd":
        inner = optim.sgd(schedule, optim_cfg.momentum, optim_cfg.nesterov, optim_cfg.weight_decay)
    else:
        raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {optim_cfg.name!r}")
    if optim_cfg.clip_norm is None:
        return inner
    return optim.chain(optim.clip_by_global_norm(optim_cfg.clip_norm), inner)


def build_strategy(strategy_cfg: Any) -> Strategy:
    """The `strategy` config node as a `Strategy` (its own validation: unknown keys, rule shapes)."""
    raw = OmegaConf.to_container(strategy_cfg, resolve=True) if OmegaConf.is_config(strategy_cfg) else strategy_cfg
    return Strategy.from_dict(raw)


def mesh_shape(mesh_cfg: Any) -> dict[str, int]:
    """{"dp": .., "tp": ..} in mesh order (tp varies fastest, so tp peers are neighbouring ranks)."""
    return {"dp": int(mesh_cfg.dp), "tp": int(mesh_cfg.tp)}


def check_layouts(cfg: Any, strategy: Strategy) -> None:
    """Every parameter and optimizer-state leaf splits evenly under the strategy on the mesh.

    Built on the meta device (no memory, no processes), so a leaf that does not divide is a
    `SpecError` naming its path before any rank starts.
    """
    vocab_size = data.load_dataset(cfg.data.name, cfg.data.val_fraction).vocab_size
    model = build_model(cfg.model, vocab_size)
    with torch.device("meta"):
        params = model.init(cfg.seed, DTYPES[cfg.model.dtype])
        opt_state = build_optimizer(cfg.optim, build_schedule(cfg.optim, cfg.steps)).init(params)
    mesh = Mesh.abstract(mesh_shape(cfg.mesh))
    shard(params, param_specs(strategy, params), mesh)
    shard(opt_state, state_specs(strategy, opt_state, params), mesh)


def build_precision(cfg: Any) -> Precision:
    """The mixed-precision policy named by `precision` and `reduce_dtype` (fp32 when absent)."""
    return Precision.named(getattr(cfg, "precision", "fp32"), getattr(cfg, "reduce_dtype", None))


def validate(cfg: Any, world_size: int | None = None) -> Strategy:
    """Everything about the config that would otherwise fail (or hang) inside the ranks.

    Checks the strategy, that it names only mesh axes, that the mesh fits the world (when
    given), that the global batch splits evenly over the axes the strategy splits it on, and
    that every parameter and state leaf splits evenly, and the precision, offload and remat policies.
    Returns the `Strategy`.
    """
    strategy = build_strategy(cfg.strategy)
    shape = mesh_shape(cfg.mesh)
    for axis, size in shape.items():
        if size < 1:
            raise ValueError(f"mesh.{axis}={size}: mesh axis sizes must be >= 1")
    world = shape["dp"] * shape["tp"]
    if world_size is not None and world != world_size:
        raise ValueError(f"mesh dp={shape['dp']} x tp={shape['tp']} = {world} ranks, but the job has "
                         f"{world_size}; set mesh.dp/mesh.tp so that their product is the world size")
    batch_axes = strategy.batch.all_axes()
    named = set(batch_axes) | set(P(*strategy.logical.values()).all_axes())
    for _, spec in (*strategy.params, *(strategy.opt_state or ())):
        named.update(spec.all_axes())
    unknown = sorted(named - set(shape))
    if unknown:
        raise ValueError(f"strategy {strategy.name!r} names mesh axes {unknown}, but the mesh has {sorted(shape)}")
    split = 1
    for axis in batch_axes:
        split *= shape[axis]
    if cfg.data.global_batch % split:
        raise ValueError(f"data.global_batch={cfg.data.global_batch} must be divisible by the "
                         f"{' x '.join(batch_axes)} = {split} ranks strategy {strategy.name!r} splits the batch over "
                         f"(e.g. data.global_batch={split * -(-cfg.data.global_batch // split)})")
    check_local_batch(cfg.data.global_batch, split, getattr(cfg, "grad_accum", 1))
    build_precision(cfg)
    check_policy(getattr(cfg, "remat", "none"))
    check_offload(getattr(cfg, "offload", "none"))
    check_layouts(cfg, strategy)
    return strategy
