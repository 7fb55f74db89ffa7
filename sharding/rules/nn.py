"""Neural-net composites: softmax over a dim, layer norm over trailing dims, and fused attention."""
from __future__ import annotations

import torch

from .. import ring_attention
from ..layout import Strided
from . import Choice, handles_strided, rule, tensor_inputs
from .choose import PARTIAL, REPLICATE, is_shard

aten = torch.ops.aten


def _follow(ctx, node, axis, inputs, allowed_dims, leader=None, outputs=None):
    """All `inputs` share one placement: the leader's shard if it is on an allowed dim, else Replicate.

    Partials are reduced (into that shard, or fully). `outputs` maps the chosen placement to the
    op's output placement(s).
    """
    leader = leader if leader is not None else inputs[0]
    placement = ctx.placement(leader, axis)
    if not (is_shard(placement) and placement in allowed_dims):
        placement = next((ctx.placement(i, axis) for i in inputs
                          if is_shard(ctx.placement(i, axis)) and ctx.placement(i, axis) in allowed_dims), REPLICATE)
    required = {i: placement for i in inputs}
    return Choice(outputs(placement) if outputs else placement, required)


@rule(aten._softmax.default, aten._log_softmax.default, aten._safe_softmax.default)
def softmax(ctx, node, axis):
    x, dim = node.args[0], node.args[1] % ctx.ndim(node.args[0])
    return _follow(ctx, node, axis, [x], [d for d in range(ctx.ndim(x)) if d != dim])


@rule(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default)
def softmax_backward(ctx, node, axis):
    grad, out, dim = node.args[0], node.args[1], node.args[2] % ctx.ndim(node.args[0])
    return _follow(ctx, node, axis, [grad, out], [d for d in range(ctx.ndim(grad)) if d != dim], leader=out)


@rule(aten.native_layer_norm.default)
def layer_norm(ctx, node, axis):
    x, normalized, weight, bias = node.args[0], node.args[1], node.args[2], node.args[3]
    leading = list(range(ctx.ndim(x) - len(normalized)))
    choice = _follow(ctx, node, axis, [x], leading)
    for param in (weight, bias):
        if isinstance(param, torch.fx.Node):
            choice.inputs[param] = REPLICATE
    placement = choice.output
    return Choice((placement, placement, placement), choice.inputs)


@rule(aten.native_layer_norm_backward.default)
def layer_norm_backward(ctx, node, axis):
    grad, x, normalized, mean, rstd, weight, bias = node.args[:7]
    leading = list(range(ctx.ndim(x) - len(normalized)))
    choice = _follow(ctx, node, axis, [grad, x, mean, rstd], leading, leader=x)
    for param in (weight, bias):
        if isinstance(param, torch.fx.Node):
            choice.inputs[param] = REPLICATE
    placement = choice.output
    # Weight/bias gradients sum over the leading dims: a split leading dim leaves them Partial.
    param_grad = PARTIAL if is_shard(placement) else REPLICATE
    return Choice((placement, param_grad, param_grad), choice.inputs)


ATTENTION_FORWARD = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: 2,
    aten._scaled_dot_product_flash_attention.default: 9,
    aten._scaled_dot_product_efficient_attention.default: 4,
}
ATTENTION_BACKWARD = {
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 3,
    aten._scaled_dot_product_flash_attention_backward.default: 3,
    aten._scaled_dot_product_efficient_attention_backward.default: 4,
}


def _attention(ctx, node, axis, count):
    """Batch and heads (dims 0, 1) may be split; sequence and head dim must be whole."""
    inputs = [i for i in tensor_inputs(node) if ctx.ndim(i) >= 3]
    leader = next((i for i in inputs if is_shard(ctx.placement(i, axis)) and ctx.placement(i, axis) in (0, 1)),
                  inputs[0])
    choice = _follow(ctx, node, axis, inputs, [0, 1], leader=leader)
    placement = choice.output
    if is_shard(placement):
        size = ctx.shape(leader)[placement]
        for i in inputs:  # a broadcast mask ([b, 1, s, s]) stays whole on the dim it broadcasts
            if ctx.shape(i)[placement] != size:
                choice.inputs[i] = REPLICATE
    outputs = []
    for val in node.meta["val"][:count] if isinstance(node.meta["val"], (list, tuple)) else [node.meta["val"]]:
        outputs.append(placement if isinstance(val, torch.Tensor) and val.dim() >= 2 else REPLICATE)
    while len(outputs) < count:
        outputs.append(REPLICATE)
    return Choice(tuple(outputs), choice.inputs)


RING = {ring_attention.FORWARD: 0, ring_attention.BACKWARD: 1}  # op -> index of its queries


def _ring(ctx, node, axis):
    """Queries split on the sequence (dim 2 of [b, h, s, d]) over `axis`, in blocks or striped (one
    token per rank in turn): ring attention there (`sharding.ring_attention`): every operand split
    alike (keys, values, in the backward the output, its gradient and the log-sum-exp), each result
    split on the sequence; None otherwise."""
    query = node.args[RING[node.target]]
    placement = ctx.placement(query, axis)
    striped = isinstance(placement, Strided) and placement.dim == 2 and \
        placement.chunks * ctx.axis_sizes[axis] == ctx.shape(query)[2]
    if not (striped or (is_shard(placement) and placement == 2)):
        return None
    if node.kwargs.get("attn_mask") is not None:
        raise ctx.error(node, "ring attention (queries split on the sequence) supports a causal or no mask, "
                              "not an explicit attn_mask; pass is_causal=True, or constrain the queries "
                              "whole on the sequence")
    _, dropout, _ = ring_attention.arguments(node)
    if dropout:
        raise ctx.error(node, "ring attention does not support attention dropout; set it to 0")
    required = {i: placement for i in tensor_inputs(node) if ctx.ndim(i) >= 3}
    count = len(node.meta["val"])
    return Choice(tuple(placement for _ in range(count)), required, local="ring_attention")


@handles_strided
def _attention_rule(ctx, node, axis):
    count = len(node.meta["val"]) if isinstance(node.meta["val"], (list, tuple)) else 1
    if node.target in RING:
        ring = _ring(ctx, node, axis)
        if ring is not None:
            return ring
    for operand in tensor_inputs(node):  # no other attention rule places a chunked split: seen whole
        if isinstance(ctx.placement(operand, axis), Strided):
            ctx.effective[operand] = ctx.layout(operand).with_axis(axis, REPLICATE)
    return _attention(ctx, node, axis, count)


rule(*ATTENTION_FORWARD, *ATTENTION_BACKWARD)(_attention_rule)
