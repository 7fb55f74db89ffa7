"""The project's GPT as `nn.Linear` / `nn.LayerNorm` modules under torch's own tensor parallelism.

`parallelize_module` splits only `nn.Linear`, `nn.Embedding` and norm modules, so this is the same
math as `gpt.apply` (a weight `w` of ours is `Linear.weight = w.T`) written with them. The plans
are Megatron's as torchtitan writes them: q, k, v and the MLP's first projection column-parallel,
the output projections row-parallel; with sequence parallelism the norms run on the sequence
shard (`SequenceParallel`), each attention and MLP gathers its input once (`PrepareModuleInput`)
and the row-parallel outputs are reduce-scattered back to the sequence shard. The embeddings and
the head stay replicated, as in our `tp` and `tp_sp` strategy files. Data parallelism over the
other mesh axis all-reduces the gradients in one flat bucket after the backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from functional_parallel.models import gpt


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.t())
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _norm(p: dict, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(p["w"].shape[0], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(p["w"])
        norm.bias.copy_(p["b"])
    return norm


class Attention(nn.Module):
    def __init__(self, p: dict, n_heads: int):
        super().__init__()
        self.head_dim = p["wq"].shape[0] // n_heads
        self.wq, self.wk, self.wv, self.wo = (_linear(p[name]) for name in ("wq", "wk", "wv", "wo"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shapes come from each projection's output: under TP it holds this rank's heads only.
        q, k, v = (t.view(t.shape[0], t.shape[1], -1, self.head_dim).transpose(1, 2)
                   for t in (self.wq(x), self.wk(x), self.wv(x)))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.wo(out.reshape(out.shape[0], out.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        self.w_in, self.w_out = _linear(p["w_in"], p["b_in"]), _linear(p["w_out"], p["b_out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, block: dict, cfg: gpt.GPTConfig):
        super().__init__()
        self.ln1, self.attn = _norm(block["ln1"], cfg.ln_eps), Attention(block["attn"], cfg.n_heads)
        self.ln2, self.mlp = _norm(block["ln2"], cfg.ln_eps), MLP(block["mlp"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LinearGPT(nn.Module):
    """`gpt.apply`'s math over a copy of `params`; `forward(batch)` is `gpt.loss`."""

    def __init__(self, params: dict, cfg: gpt.GPTConfig):
        super().__init__()
        self.wte = nn.Parameter(params["wte"].detach().clone())
        self.wpe = nn.Parameter(params["wpe"].detach().clone())
        self.blocks = nn.ModuleList(Block(block, cfg) for block in params["blocks"])
        self.ln_f = _norm(params["ln_f"], cfg.ln_eps)
        self.head = _linear(params["head"])
        self.sequence_mesh = None  # under sequence parallelism: the tp mesh the residual's seq is split over

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte[tokens] + self.wpe[torch.arange(tokens.shape[1], device=tokens.device)]
        if self.sequence_mesh is not None:  # the residual stream holds this rank's sequence block
            from torch.distributed.tensor import DTensor, Replicate, Shard

            # A local slice forward; its backward gathers the blocks' gradients (the embeddings' is whole).
            x = DTensor.from_local(x, self.sequence_mesh, [Replicate()], run_check=False)
            x = x.redistribute(self.sequence_mesh, [Shard(1)]).to_local()
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.logits(batch["inputs"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))


def parallelize(module: LinearGPT, tp_mesh, sequence_parallel: bool) -> LinearGPT:
    """Megatron's plan over `tp_mesh` (a 1-D DeviceMesh), as torchtitan applies it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    plan = {}
    for i in range(len(module.blocks)):
        prefix = f"blocks.{i}"
        plan.update({f"{prefix}.attn.{name}": ColwiseParallel() for name in ("wq", "wk", "wv")})
        plan[f"{prefix}.mlp.w_in"] = ColwiseParallel()
        row = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
        plan[f"{prefix}.attn.wo"], plan[f"{prefix}.mlp.w_out"] = row, row
        if sequence_parallel:
            gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                        use_local_output=True)
            plan.update({f"{prefix}.ln1": SequenceParallel(), f"{prefix}.ln2": SequenceParallel(),
                         f"{prefix}.attn": gather, f"{prefix}.mlp": gather})
    if sequence_parallel:
        plan["ln_f"] = SequenceParallel()
        plan["head"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                          use_local_output=True)
        module.sequence_mesh = tp_mesh
    return parallelize_module(module, tp_mesh, plan)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a plain tensor is its own)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_reduce_gradients(module: nn.Module, group) -> None:
    """Average every gradient over `group` (data parallel) in one flat bucket, as one DDP bucket."""
    grads = [local(p.grad) for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
