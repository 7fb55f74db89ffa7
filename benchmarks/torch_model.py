"""The project's GPT as an `nn.Module`, so torch's own DDP and FSDP2 can train the same math.

The module holds the very tensors of a `gpt.init` tree as parameters (one small module per
dict of leaves, one module per block, so FSDP2 can shard block by block) and its forward calls
the model file's own attention, MLP and layer-norm functions in `gpt.apply`'s order. A test
checks that `GPTModule(params, cfg).logits(tokens)` equals `gpt.apply(params, tokens, cfg)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from functional_parallel.models import gpt


class Leaves(nn.Module):
    """A flat dict of tensors as parameters; `tree()` gives back the dict (current parameters)."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.names = tuple(tensors)
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor.detach().clone()))

    def tree(self) -> dict:
        return {name: getattr(self, name) for name in self.names}


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, block: dict, cfg: gpt.GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.attn = Leaves(block["ln1"]), Leaves(block["attn"])
        self.ln2, self.mlp = Leaves(block["ln2"]), Leaves(block["mlp"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.ln_eps
        x = x + gpt._attention(self.attn.tree(), gpt._layer_norm(x, self.ln1.tree(), eps), self.cfg.n_heads)
        return x + gpt._mlp(self.mlp.tree(), gpt._layer_norm(x, self.ln2.tree(), eps))


class GPTModule(nn.Module):
    """`logits(tokens)` is `gpt.apply` over a copy of `params`; `forward(batch)` is `gpt.loss`."""

    def __init__(self, params: dict, cfg: gpt.GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Leaves({"wte": params["wte"], "wpe": params["wpe"]})
        self.blocks = nn.ModuleList(Block(block, cfg) for block in params["blocks"])
        self.ln_f = Leaves(params["ln_f"])
        self.head = Leaves({"head": params["head"]})

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed.wte[tokens] + self.embed.wpe[positions]  # [B, S, D]
        for block in self.blocks:
            x = block(x)
        return gpt._layer_norm(x, self.ln_f.tree(), self.cfg.ln_eps) @ self.head.head  # [B, S, V]

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss, as `gpt.loss` (forward returns it so DDP and FSDP2 hooks wrap the whole step)."""
        logits = self.logits(batch["inputs"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))
