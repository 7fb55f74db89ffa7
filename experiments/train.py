"""`python -m experiments.train`: train a model on real text, single process, with Hydra configs.

Writes into the Hydra run dir: `metrics.jsonl` (one JSON object per logged step),
TensorBoard events (`tb/`), `loss.png`, and the resolved `config.yaml`. `run(cfg, output_dir)`
does the work and is importable without Hydra's entry point (tests call it directly).
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from experiments import config as _config  # noqa: F401  (registers the structured configs)
from functional_parallel import data, models, optim
from functional_parallel.train import make_eval_step, make_train_step

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_model(model_cfg: Any, vocab_size: int) -> models.Model:
    """The configured architecture and size, with the tokenizer's vocabulary."""
    overrides = {key: model_cfg[key] for key in ("d_model", "n_layers", "n_heads", "seq_len",
                                                  "fused_qkv", "n_kv_heads")}
    return models.build(model_cfg.arch, model_cfg.size, vocab_size=vocab_size, **overrides)


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


class MetricsWriter:
    """One sink for metrics: JSON lines, TensorBoard scalars, and the history for the plot."""

    def __init__(self, output_dir: pathlib.Path):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(output_dir / "metrics.jsonl", "w")
        self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tb"))
        self.history: list[dict] = []

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **values}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def plot_losses(history: list[dict], path: pathlib.Path) -> None:
    """Train (and validation, where measured) loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            axes.plot(*zip(*points), style, label=key)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/char)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def evaluate(eval_step, params, dataset: data.TextDataset, cfg: DictConfig, seq_len: int) -> float:
    """Mean validation loss over `cfg.eval_batches` fixed batches."""
    losses = [
        eval_step(params, dataset.get_batch("val", i, cfg.data.global_batch, seq_len, cfg.seed)).item()
        for i in range(cfg.eval_batches)
    ]
    return sum(losses) / len(losses)


def run(cfg: DictConfig, output_dir: str | pathlib.Path) -> dict[str, float]:
    """Train as configured; write metrics, plot and config into `output_dir`; return a summary."""
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    dataset = data.load_dataset(cfg.data.name, cfg.data.val_fraction)
    model = build_model(cfg.model, dataset.vocab_size)
    seq_len, batch = model.cfg.seq_len, cfg.data.global_batch
    params = model.init(cfg.seed, DTYPES[cfg.model.dtype])
    schedule = build_schedule(cfg.optim, cfg.steps)
    optimizer = build_optimizer(cfg.optim, schedule)
    opt_state = optimizer.init(params)
    train_step, eval_step = make_train_step(model.loss, optimizer), make_eval_step(model.loss)

    writer = MetricsWriter(output_dir)
    summary: dict[str, float] = {}
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    start = window_start
    with _progress(cfg.progress) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=math.nan, tok_s=0.0)
        for step in range(cfg.steps):
            batch_data = dataset.get_batch("train", step, batch, seq_len, cfg.seed)
            params, opt_state, metrics = train_step(params, opt_state, batch_data)
            loss = metrics["loss"].item()
            summary.setdefault("first_loss", loss)
            window_loss, window_tokens = window_loss + loss, window_tokens + batch * seq_len
            last = step == cfg.steps - 1
            if (step + 1) % cfg.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                record = {"loss": window_loss / (window_tokens / (batch * seq_len)),
                          "grad_norm": metrics["grad_norm"].item(),
                          "lr": schedule(torch.tensor(step)).item(),
                          "tokens_per_s": window_tokens / elapsed}
                if (step + 1) % cfg.eval_every == 0 or last:
                    record["val_loss"] = evaluate(eval_step, params, dataset, cfg, seq_len)
                writer.write(step + 1, record)
                progress.update(task, loss=record["loss"], tok_s=record["tokens_per_s"])
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            progress.advance(task)
    writer.close()
    plot_losses(writer.history, output_dir / "loss.png")
    summary.update(final_loss=writer.history[-1]["loss"], val_loss=writer.history[-1]["val_loss"],
                   seconds=time.perf_counter() - start, steps=cfg.steps)
    return summary


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run in Hydra's output dir and print the summary."""
    summary = run(cfg, HydraConfig.get().runtime.output_dir)
    print(json.dumps({key: round(value, 4) for key, value in summary.items()}))


if __name__ == "__main__":
    main()
