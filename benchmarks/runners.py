"""One runner per contender, each training the same GPT on the same batches from the same init.

`Problem` is the shared setup (model, init, global batches, the pure AdamW step). A runner
owns one strategy's per-rank state and exposes the same four things, so the driver treats ours
and torch's alike: `step(i)` (one train step on batch i, returns the loss), `global_loss`,
`live()` (the tensors alive between steps, for the memory tracker) and `mesh`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from functional_parallel import optim
from functional_parallel.tree import tree_map
from functional_parallel.models import build
from functional_parallel.parallel import Strategy, compile_step, example_mesh
from sharding import Mesh, comm_timeline, shard, timeline

from .torch_model import GPTModule


@dataclass
class Problem:
    """The model, its init, a few global batches and the pure step, identical for every runner."""

    cfg: object
    params: dict
    batches: list
    optimizer: object
    loss_fn: object
    lr: float
    device: torch.device
    axes: object = None  # the model's logical parameter axes (read by the strategies' param_axes)

    @classmethod
    def make(cls, d_model, n_layers, n_heads, seq_len, vocab_size, global_batch, lr, device, num_batches=4, seed=0):
        model = build("gpt", "tiny", d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len,
                      vocab_size=vocab_size)
        params = tree_map(lambda p: p.to(device), model.init(seed))
        generator = torch.Generator().manual_seed(seed + 1)
        batches = []
        for _ in range(num_batches):
            tokens = torch.randint(0, vocab_size, (global_batch, seq_len + 1), generator=generator).to(device)
            batches.append({"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()})
        # AdamW as torch.optim.AdamW's defaults (decay on every leaf), no clipping: the same math as the baselines
        return cls(model.cfg, params, batches, optim.adamw(lr), model.loss, lr, torch.device(device),
                   model.axes(params))

    def step_fn(self):
        """`step(params, opt_state, batch) -> (params, opt_state, {"loss"})`: what our compiler shards."""
        grad_and_loss = torch.func.grad_and_value(self.loss_fn)
        optimizer = self.optimizer

        def step(params, opt_state, batch):
            grads, loss = grad_and_loss(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optim.apply_updates(params, updates), opt_state, {"loss": loss}

        return step


class OursRunner:
    """A strategy from `conf/strategy/` compiled by `sharding` on its example mesh."""

    kind = "ours"

    def __init__(self, name: str, problem: Problem, compile_graph: bool = False, bucket_bytes: int | None = None,
                 bucket_per_layer: bool = False):
        started = time.perf_counter()
        self.name = name
        full = example_mesh(name)
        self.mesh_shape = {a: s for a, s in full.items() if s > 1}
        mesh = Mesh(full)
        opt_state = problem.optimizer.init(problem.params)
        compiled, (pspecs, sspecs, bspec) = compile_step(problem.step_fn(), Strategy.load(name), mesh,
                                                         problem.params, opt_state, axes=problem.axes,
                                                         bucket_per_layer=bucket_per_layer,
                                                         **({} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}))
        self.params, self.opt_state = shard(problem.params, pspecs, mesh), shard(opt_state, sspecs, mesh)
        self.batches = [shard(batch, bspec, mesh) for batch in problem.batches]
        self.lowered = compiled.lower(self.params, self.opt_state, self.batches[0])
        self.call = self.eager = compiled
        if compile_graph:
            from sharding.compile import compile_lowered

            self.call = compile_lowered(self.lowered).run
        self.setup_s = time.perf_counter() - started

    def step(self, index: int, eager: bool = False) -> torch.Tensor:
        """One step; `eager` runs the uncompiled graph (a compiled one cannot run under a dispatch mode)."""
        call = self.eager if eager else self.call
        self.params, self.opt_state, metrics = call(self.params, self.opt_state, self.batches[index % len(self.batches)])
        return metrics["loss"]

    def timeline_step(self, index: int) -> tuple[torch.Tensor, dict]:
        """One eager step whose collectives' times on this rank are recorded: (loss, timeline).
        On CUDA the times are the host's (when each op was launched or waited on)."""
        timed = comm_timeline.instrument(self.lowered)
        with timeline.recording() as records:
            self.params, self.opt_state, metrics = timed.run(self.params, self.opt_state,
                                                             self.batches[index % len(self.batches)])
        return metrics["loss"], comm_timeline.spans(records, timed.graph.fp_timeline_collectives)

    def global_loss(self, loss: torch.Tensor) -> float:
        return loss.item()  # out_specs P(): already the global mean

    def live(self):
        return self.params, self.opt_state, self.batches

    def planned(self) -> dict:
        return {"peak_bytes": self.lowered.cost["peak_bytes"], "bytes_by_kind": self.lowered.cost["bytes_by_kind"],
                "num_collectives": self.lowered.cost["num_collectives"], "graph_nodes": len(self.lowered.graph.graph.nodes)}


class TorchRunner:
    """torch's own DDP or FSDP2 (`fully_shard` per block, then the root) over all ranks as data parallel.

    AdamW is `torch.optim.AdamW(foreach=True)` (faster than the per-parameter loop on CPU).
    DDP uses `gradient_as_bucket_view=True`: gradients live in its buckets (no copy), so they are
    tensors the memory tracker can see between steps.
    """

    kind = "torch"
    dp_group = None  # the data-parallel process group: here every rank

    def __init__(self, name: str, problem: Problem):
        started = time.perf_counter()
        self.name = name
        world, rank = dist.get_world_size(), dist.get_rank()
        self.mesh_shape = {"dp": world}
        module = GPTModule(problem.params, problem.cfg).to(problem.device)
        if name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [problem.device.index] if problem.device.type == "cuda" else None
            self.module = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
        elif name == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in module.blocks:
                fully_shard(block)
            self.module = fully_shard(module)
        else:
            raise ValueError(f"unknown torch baseline {name!r}; expected 'ddp' or 'fsdp2'")
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=problem.lr, foreach=True)
        rows = problem.batches[0]["inputs"].shape[0] // world
        self.batches = [{k: v[rank * rows:(rank + 1) * rows].contiguous() for k, v in batch.items()}
                        for batch in problem.batches]
        self.setup_s = time.perf_counter() - started

    def step(self, index: int, eager: bool = True) -> torch.Tensor:
        loss = self.module(self.batches[index % len(self.batches)])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.name != "ddp")  # DDP: keep the bucket views, zero in place
        return loss.detach()

    def global_loss(self, loss: torch.Tensor) -> float:
        total = loss.clone()
        dist.all_reduce(total, group=self.dp_group)  # a tensor-parallel group's peers hold the same loss
        return total.item() / dist.get_world_size(self.dp_group)

    def live(self):
        params = list(self.module.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        return params, grads, list(self.optimizer.state.values()), self.batches

    def planned(self) -> dict:
        return {}


class TorchTPRunner(TorchRunner):
    """torch's own Megatron TP (`torch_tp`) or TP + SP (`torch_tp_sp`) on the mesh of our `tp`
    strategy file, data parallel over its other axis (`benchmarks/torch_tp.py`)."""

    OURS = {"torch_tp": "tp", "torch_tp_sp": "tp_sp"}

    def __init__(self, name: str, problem: Problem):
        from torch.distributed.device_mesh import init_device_mesh

        from .torch_tp import LinearGPT, parallelize

        started = time.perf_counter()
        self.name = name
        self.mesh_shape = example_mesh(self.OURS[name])
        (dp, tp), names = self.mesh_shape.values(), tuple(self.mesh_shape)
        mesh = init_device_mesh(problem.device.type, (dp, tp), mesh_dim_names=names)
        self.dp_group = mesh[names[0]].get_group()
        module = LinearGPT(problem.params, problem.cfg).to(problem.device)
        self.module = parallelize(module, mesh[names[1]], sequence_parallel=name == "torch_tp_sp")
        split = [p for p in self.module.parameters() if hasattr(p, "to_local")]
        whole = [p for p in self.module.parameters() if not hasattr(p, "to_local")]
        # foreach kernels take DTensors or plain tensors, not both in one call: two groups
        self.optimizer = torch.optim.AdamW([{"params": split}, {"params": whole}], lr=problem.lr, foreach=True)
        rows = problem.batches[0]["inputs"].shape[0] // dp
        first = mesh[names[0]].get_local_rank() * rows
        self.batches = [{k: v[first:first + rows].contiguous() for k, v in batch.items()} for batch in problem.batches]
        self.setup_s = time.perf_counter() - started

    def step(self, index: int, eager: bool = True) -> torch.Tensor:
        from .torch_tp import all_reduce_gradients

        loss = self.module(self.batches[index % len(self.batches)])
        loss.backward()
        all_reduce_gradients(self.module, self.dp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


TORCH_CONTENDERS = ("ddp", "fsdp2", "torch_tp", "torch_tp_sp")


def make_runner(name: str, problem: Problem, compile_graph: bool = False, bucket_bytes: int | None = None,
                bucket_per_layer: bool = False):
    if name in ("ddp", "fsdp2"):
        return TorchRunner(name, problem)
    if name in TorchTPRunner.OURS:
        return TorchTPRunner(name, problem)
    return OursRunner(name, problem, compile_graph, bucket_bytes, bucket_per_layer)
