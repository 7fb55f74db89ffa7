"""Ring attention: SDPA whose queries, keys and values are split on the sequence over one mesh axis.

Each rank keeps its block of queries and passes its key/value block around the ring (point-to-point
sends to the next rank, receives from the previous), so no rank ever holds more than two key/value
blocks: memory O(s/P). A block's partial result is merged with the online-softmax rescaling, using
the log-sum-exp the SDPA kernel already returns. Under a causal mask a rank skips the blocks after
its own and masks the diagonal one; with the sequence striped over the ranks (`sharding.striped`)
every block is a triangle and every rank does the same work. The backward passes the key/value
blocks around again, each with the gradient of its keys and values accumulating on the way, and
sends that gradient home at the end; the kernel's own backward, given the merged output and
log-sum-exp, gives each block's exact share. Each next block is on its way while the current one
is computed. These are the per-rank functions the insert stage puts in place of the aten ops
(`Choice.local == "ring_attention"`); the rule is `sharding.rules.nn`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.distributed_c10d import _resolve_process_group

aten = torch.ops.aten
FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def arguments(node) -> tuple[tuple, float, bool]:
    """(the tensor operands, dropout_p, is_causal) of a traced FORWARD or BACKWARD call."""
    if node.target is BACKWARD:  # grad_out, q, k, v, out, lse, dropout_p, is_causal
        return tuple(node.args[:6]), node.args[6], node.args[7]
    args = list(node.args) + [0.0, False][len(node.args) - 3:]  # q, k, v[, dropout_p[, is_causal]]
    return tuple(args[:3]), args[3], args[4]


def _start_exchange(tensors: list[torch.Tensor], rank: int, size: int, group_name: str) -> tuple[list, list]:
    """Start sending `tensors` to the next rank of the ring and receiving the previous rank's;
    returns (the buffers they arrive in, the requests `_finish` waits on). On fake tensors, as the
    memory and cost walks run a program, only the buffers."""
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    if any(isinstance(t, FakeTensor) for t in tensors):
        return received, []
    group = _resolve_process_group(group_name)
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    receive_from = dist.get_global_rank(group, (rank - 1) % size)
    requests = [dist.isend(t.contiguous(), send_to, group=group) for t in tensors]
    requests += [dist.irecv(buffer, receive_from, group=group) for buffer in received]
    return received, requests


def _finish(started: tuple[list, list]) -> list[torch.Tensor]:
    received, requests = started
    for request in requests:
        request.wait()
    return received


def _strided_like(template: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in `template`'s memory layout (the kernel's outputs are views the traced graph reshapes)."""
    if value.stride() == template.stride():
        return value
    out = torch.empty_strided(template.shape, template.stride(), dtype=template.dtype, device=template.device)
    return out.copy_(value)


def _visible(block: int, rank: int, is_causal: bool, striped: bool = False) -> str | None:
    """Which of this rank's queries see which keys of rank `block`'s block: "all", "causal" (query i
    sees keys 0..i), "strict" (keys 0..i-1), or None (none).

    In blocks (rank r holds positions [r·L, (r+1)·L)) a causal rank r sees earlier blocks whole, its
    own causally and none after: rank r does r + 1 blocks' work. Striped (rank r holds r, r + P,
    r + 2P, ...) every block is a triangle, causal from ranks up to r and strict from the ranks
    after: every rank does the same work."""
    if not is_causal:
        return "all"
    if striped:
        return "causal" if block <= rank else "strict"
    return "all" if block < rank else "causal" if block == rank else None


def _strict_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Additive mask letting query i see keys 0..i-1 (its first row sees none)."""
    seen = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(-1)
    return torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float("-inf"))


def _attend(q, k, v, dropout_p, seen: str, scale):
    """(out, lse) of the queries against one key/value block; a row that sees nothing has lse -inf."""
    if seen == "strict":
        out, lse = FORWARD(q, k, v, dropout_p, False, attn_mask=_strict_mask(q, k), scale=scale)[:2]
        lse = lse.clone()
        lse[..., 0] = float("-inf")  # the kernel reports 0 for a row with no key; nothing is there to merge
        return out, lse
    return FORWARD(q, k, v, dropout_p, seen == "causal", scale=scale)[:2]


def _attend_backward(grad_out, q, k, v, out, lse, dropout_p, seen: str, scale):
    mask = _strict_mask(q, k) if seen == "strict" else None
    return BACKWARD(grad_out, q, k, v, out, lse, dropout_p, seen == "causal", attn_mask=mask, scale=scale)


def ring_attention_forward(q, k, v, dropout_p: float, is_causal: bool, scale, rank: int, size: int,
                           group_name: str, striped: bool = False):
    """(out, logsumexp) of this rank's queries against every rank's keys and values."""
    out = lse = layout = None  # layout: the kernel's first output, whose memory layout the result keeps
    for step in range(size):
        block = (rank - step) % size
        # The next block travels while this one is computed.
        incoming = _start_exchange([k, v], rank, size, group_name) if step < size - 1 else None
        seen = _visible(block, rank, is_causal, striped)
        if seen is not None:
            part, part_lse = _attend(q, k, v, dropout_p, seen, scale)
            if out is None:
                out, lse, layout = part, part_lse, part
            else:
                merged = torch.logaddexp(lse, part_lse)
                out = out * torch.exp(lse - merged).unsqueeze(-1).to(out.dtype) + \
                    part * torch.exp(part_lse - merged).unsqueeze(-1).to(out.dtype)
                lse = merged
        if incoming is not None:
            k, v = _finish(incoming)
    return _strided_like(layout, out), lse


def ring_attention_backward(grad_out, q, k, v, out, lse, dropout_p: float, is_causal: bool, scale,
                            rank: int, size: int, group_name: str, striped: bool = False):
    """(dq, dk, dv) for this rank's blocks: each key/value block collects its gradient as it travels."""
    dq = dk = dv = layouts = None
    for step in range(size):  # step 0 is this rank's own block, which it always sees
        block = (rank - step) % size
        blocks = _start_exchange([k, v], rank, size, group_name) if step < size - 1 else None
        seen = _visible(block, rank, is_causal, striped)
        if seen is not None:
            parts = _attend_backward(grad_out, q, k, v, out, lse, dropout_p, seen, scale)
            if layouts is None:
                layouts, (dq, dk, dv) = parts, parts
            else:
                dq, dk, dv = dq + parts[0], dk + parts[1], dv + parts[2]
        if blocks is not None:  # the block's gradient follows it once this rank has added its share
            gradients = _start_exchange([dk, dv], rank, size, group_name)
            (k, v), (dk, dv) = _finish(blocks), _finish(gradients)
    dk, dv = _finish(_start_exchange([dk, dv], rank, size, group_name))  # each block's gradient goes home
    return tuple(_strided_like(template, value) for template, value in zip(layouts, (dq, dk, dv)))


def bytes_sent(kv_bytes: int, size: int, backward: bool) -> int:
    """What one rank sends per call: the forward passes k and v on P-1 times; the backward passes k,
    v and their gradients on P-1 times, then the gradients once more (home)."""
    return (size - 1) * kv_bytes * (2 if backward else 1) + (kv_bytes if backward else 0)
