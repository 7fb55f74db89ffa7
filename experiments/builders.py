"""From config nodes to objects: model, schedule, optimizer, strategy, mesh shape; and the checks
that must fail before any process is spawned."""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf

from functional_parallel import config_dirs, data, models, optim
from sharding.disk import check_disk_dir
from functional_parallel.parallel import (Strategy, check_offload, param_logical_axes, param_specs, pipeline_of,
                                         state_specs)
from functional_parallel.precision import Precision
from functional_parallel.train import check_local_batch
from sharding import Mesh, Pipeline, shard
from sharding.remat import check_policy

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_model(model_cfg: Any, vocab_size: int) -> models.Model:
    """The configured architecture and size, with the tokenizer's vocabulary padded to `vocab_multiple`
    (arch=hf: the Hugging Face causal LM of `model.hf`, from its config: no weights downloaded)."""
    if model_cfg.arch == "hf":
        from functional_parallel.models import hf

        if not model_cfg.get("hf") or not model_cfg.get("seq_len"):
            raise ValueError("model.arch=hf needs model.hf (a transformers config: model_type and its fields) and "
                             "model.seq_len; see conf/model/hf_gpt2.yaml")
        plan = OmegaConf.to_container(model_cfg.tp_plan) if model_cfg.get("tp_plan") else None
        return hf.build(OmegaConf.to_container(model_cfg.hf), vocab_size=models.padded_vocab(
            vocab_size, model_cfg.vocab_multiple), seq_len=model_cfg.seq_len, tp_plan=plan, name=model_cfg.size,
            dropout=bool(model_cfg.get("dropout", False)))
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
    """The mesh as {axis: size} in order (the last axis varies fastest over ranks): a mapping, or the
    name of a `conf/meshes/` file (Hydra's search path included). A ValueError for anything else."""
    if isinstance(mesh_cfg, str):
        mesh_cfg = config_dirs.load("meshes", mesh_cfg)
    elif OmegaConf.is_config(mesh_cfg):
        mesh_cfg = OmegaConf.to_container(mesh_cfg, resolve=True)
    if not isinstance(mesh_cfg, dict) or not mesh_cfg:
        raise ValueError(f"mesh={mesh_cfg!r}: expected a conf/meshes name or axis sizes in order, e.g. "
                         "mesh='{dp: 2, tp: 2}'")
    bad = {axis: size for axis, size in mesh_cfg.items()
           if not isinstance(axis, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1}
    if bad:
        raise ValueError(f"mesh {mesh_cfg}: every axis needs a positive int size; got "
                         + ", ".join(f"mesh.{axis}={size!r}" for axis, size in bad.items()))
    return dict(mesh_cfg)


def describe_mesh(shape: dict[str, int]) -> str:
    """`dp=2 x tp=2`."""
    return " x ".join(f"{axis}={size}" for axis, size in shape.items())


def check_not_degenerate(strategy: Strategy, shape: dict[str, int]) -> None:
    """A model axis (one the strategy splits parameters or activations over, not the batch) of size 1
    would make the strategy silently something else (tp on tp=1 is data parallelism): a ValueError."""
    flat = [axis for axis in strategy.model_axes() if shape.get(axis) == 1]
    if flat:
        example = "{" + ", ".join(f"{axis}: {size}" for axis, size in strategy.example_mesh.items()) + "}"
        raise ValueError(f"strategy {strategy.name!r} splits the model over {flat}, of size 1 in the mesh "
                         f"{describe_mesh(shape)}: it would train as if those rules were not there. Give "
                         f"{' and '.join(flat)} a size > 1 (e.g. mesh='{example}'), or choose a strategy that does "
                         f"not split over {' or '.join(flat)}")


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
    axes = param_logical_axes(model, params)
    stages = pipeline_of(strategy, mesh, *pipeline_options(cfg))[0]
    shard(params, param_specs(strategy, params, axes, stages), mesh)
    shard(opt_state, state_specs(strategy, opt_state, params, axes, stages), mesh)
    check_activation_names(model, strategy, mesh_shape(cfg.mesh))


# The model dims the project's models name in their activation constrains, by config field.
_NAMED_DIMS = {"heads": "n_heads", "kv_heads": "kv_heads", "seq": "seq_len", "attention_seq": "seq_len"}


def check_activation_names(model: Any, strategy: Strategy, shape: dict) -> None:
    """The head counts and the sequence length divide over the mesh axes the strategy maps their
    logical names to (Ulysses: heads and kv_heads over sp), named before any rank starts."""
    rules = strategy.constrain_rules
    for name, field in _NAMED_DIMS.items():
        size = getattr(getattr(model, "cfg", None), field, None)
        axes = rules.get(name)
        if size is None or not axes:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        count = math.prod(shape.get(axis, 1) for axis in axes)
        if size % count:
            raise ValueError(f"strategy {strategy.name!r} splits the model's {name} ({field}={size}) over "
                             f"{' x '.join(axes)} = {count} ranks, which does not divide it; choose a mesh whose "
                             f"{' x '.join(axes)} divides {size}, or a model whose {field} it divides")


def pipeline_options(cfg: Any) -> tuple[str, int]:
    """(schedule, virtual stages per rank) of the config's `pipeline` (1f1b, 1 when absent)."""
    pipeline = getattr(cfg, "pipeline", None)
    return (pipeline.schedule, pipeline.virtual) if pipeline is not None else ("1f1b", 1)


def micro_batches(cfg: Any, strategy: Strategy) -> int:
    """Micro-batches per step: `pipeline.microbatches` under a pipelined strategy, else `grad_accum`."""
    grad_accum = getattr(cfg, "grad_accum", 1)
    if not strategy.pipeline:
        return grad_accum
    microbatches = cfg.pipeline.microbatches
    if grad_accum not in (1, microbatches):
        raise ValueError(f"strategy {strategy.name!r} is a pipeline: its micro-batches are pipeline.microbatches="
                         f"{microbatches}, but grad_accum={grad_accum} asks for another count; leave grad_accum at 1")
    return microbatches


def check_pipeline(cfg: Any, strategy: Strategy, shape: dict) -> None:
    """The schedule exists and fits the stages and micro-batches (named before any rank starts)."""
    from sharding.schedules import build as build_schedule_of

    axis = strategy.pipeline_axis
    schedule, virtual = pipeline_options(cfg)
    Pipeline(axis=axis, schedule=schedule, virtual=virtual)
    build_schedule_of(schedule, shape[axis], cfg.pipeline.microbatches, virtual)


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
    world = math.prod(shape.values())
    if world_size is not None and world != world_size:
        raise ValueError(f"mesh {describe_mesh(shape)} = {world} ranks, but the job has {world_size}; "
                         f"set the mesh so that the product of its sizes is the world size")
    batch_axes = strategy.batch_dim_axes()
    unknown = sorted(strategy.mesh_axes() - set(shape))
    if unknown:
        raise ValueError(f"strategy {strategy.name!r} names mesh axes {unknown}, but the mesh has {list(shape)}")
    check_not_degenerate(strategy, shape)
    split = 1
    for axis in batch_axes:
        split *= shape[axis]
    if cfg.data.global_batch % split:
        raise ValueError(f"data.global_batch={cfg.data.global_batch} must be divisible by the "
                         f"{' x '.join(batch_axes)} = {split} ranks strategy {strategy.name!r} splits the batch over "
                         f"(e.g. data.global_batch={split * -(-cfg.data.global_batch // split)})")
    check_local_batch(cfg.data.global_batch, split, micro_batches(cfg, strategy))
    if strategy.pipeline:
        check_pipeline(cfg, strategy, shape)
    build_precision(cfg)
    check_policy(getattr(cfg, "remat", "none"))
    if check_offload(getattr(cfg, "offload", "none")) == "disk":
        check_disk_dir(cfg.offload_dir)  # writable, before any process starts
    check_layouts(cfg, strategy)
    return strategy
