"""Every fact the pipeline needs about an op, in one entry per op (its placement rule lives beside
it in `sharding/rules`, registered per op family). Adding an op means adding its entry here (and a
rule, if its inputs can be split); no stage keeps its own list.

Facts: `view` (the output aliases the input: it allocates nothing), `shape_arg` / `stride_arg`
(which argument holds the output's global shape / strides, rewritten to local sizes by
`localize`), `split_sizes` (its argument 1 holds global piece sizes), `metadata_only` (reads only
its input's shape, dtype and device, never its values), `zeros` (creates zeros) or `fill_arg` (which argument is the fill
value), `moves_values` (views, copies, casts: a matmul operand reached from a parameter through
these alone is a weight), and `recompute` (its class under selective activation checkpointing:
"softmax", "dropout" or "batched_matmul"). `ELEMENTWISE` is every elementwise op: torch's
`pointwise`-tagged overloads and the casts, copies and fills it leaves untagged; same-shape values
joined by them share a layout hint (`joins_component`, read by `sharding.hints`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batched_matmul import BATCHED_MATMUL, LEADING_CONTRACT, LEADING_MATMUL
from .checkpoint_name import CHECKPOINT_NAME

aten = torch.ops.aten


@dataclass(frozen=True)
class OpFacts:
    view: bool = False
    shape_arg: int | None = None
    stride_arg: int | None = None
    split_sizes: bool = False
    metadata_only: bool = False
    zeros: bool = False
    fill_arg: int | None = None
    moves_values: bool = False
    recompute: str | None = None


NO_FACTS = OpFacts()
VIEW = OpFacts(view=True, moves_values=True)

REGISTRY: dict[object, OpFacts] = {
    aten.view.default: OpFacts(view=True, moves_values=True, shape_arg=1),
    aten._unsafe_view.default: OpFacts(view=True, moves_values=True, shape_arg=1),
    aten.expand.default: OpFacts(view=True, moves_values=True, shape_arg=1),
    aten.t.default: VIEW, aten.transpose.int: VIEW, aten.permute.default: VIEW, aten.slice.Tensor: VIEW,
    aten.select.int: VIEW, aten.unsqueeze.default: VIEW, aten.squeeze.dim: VIEW, aten.squeeze.dims: VIEW,
    aten.squeeze.default: VIEW, aten.alias.default: VIEW, aten.detach.default: VIEW,
    # A reshape may copy, so it is not a view; it moves values and names its shape.
    aten.reshape.default: OpFacts(moves_values=True, shape_arg=1),
    aten.clone.default: OpFacts(moves_values=True), aten._to_copy.default: OpFacts(moves_values=True),
    aten.contiguous.default: OpFacts(moves_values=True),
    aten.split.Tensor: OpFacts(split_sizes=True), aten.split_with_sizes.default: OpFacts(split_sizes=True),
    aten.new_zeros.default: OpFacts(shape_arg=1, metadata_only=True, zeros=True),
    aten.new_empty.default: OpFacts(shape_arg=1, metadata_only=True),
    aten.new_ones.default: OpFacts(shape_arg=1, metadata_only=True),
    aten.new_full.default: OpFacts(shape_arg=1, metadata_only=True, fill_arg=2),
    aten.new_empty_strided.default: OpFacts(shape_arg=1, stride_arg=2, metadata_only=True),
    aten.zeros.default: OpFacts(shape_arg=0, zeros=True), aten.ones.default: OpFacts(shape_arg=0),
    aten.empty.memory_format: OpFacts(shape_arg=0), aten.full.default: OpFacts(shape_arg=0, fill_arg=1),
    aten.empty_strided.default: OpFacts(shape_arg=0, stride_arg=1),
    # `*_like` ops read their input's shape, dtype and device, never its values (a Partial loss
    # that autodiff seeds with ones_like is not reduced for it).
    aten.zeros_like.default: OpFacts(zeros=True, metadata_only=True),
    aten.full_like.default: OpFacts(fill_arg=1, metadata_only=True),
    aten.ones_like.default: OpFacts(metadata_only=True), aten.empty_like.default: OpFacts(metadata_only=True),
    aten.rand_like.default: OpFacts(metadata_only=True), aten.randn_like.default: OpFacts(metadata_only=True),
    aten.scalar_tensor.default: OpFacts(fill_arg=0),
    aten.slice_backward.default: OpFacts(shape_arg=1), aten.select_backward.default: OpFacts(shape_arg=1),
    aten._softmax.default: OpFacts(recompute="softmax"), aten.softmax.int: OpFacts(recompute="softmax"),
    aten._safe_softmax.default: OpFacts(recompute="softmax"),
    aten.native_dropout.default: OpFacts(recompute="dropout"), aten.dropout.default: OpFacts(recompute="dropout"),
    aten.bmm.default: OpFacts(recompute="batched_matmul"), aten.baddbmm.default: OpFacts(recompute="batched_matmul"),
    aten.matmul.default: OpFacts(recompute="batched_matmul"), BATCHED_MATMUL: OpFacts(recompute="batched_matmul"),
    LEADING_MATMUL: OpFacts(recompute="batched_matmul"), LEADING_CONTRACT: OpFacts(recompute="batched_matmul"),
}


def facts(target) -> OpFacts:
    """The registry entry of an op (no facts for ops that need none: most pointwise ops)."""
    return REGISTRY.get(target, NO_FACTS)


def creates_zeros(node: torch.fx.Node) -> bool:
    """A node whose value is all zeros by construction (`new_zeros`, `full(..., 0)`)."""
    entry = facts(node.target)
    if entry.zeros:
        return True
    return entry.fill_arg is not None and len(node.args) > entry.fill_arg and node.args[entry.fill_arg] == 0


def overloads(ops) -> set:
    """Every overload of each op packet in `ops` (overloads pass through)."""
    out = set()
    for op in ops:
        if isinstance(op, torch._ops.OpOverloadPacket):
            out.update(getattr(op, o) for o in op.overloads())
        else:
            out.add(op)
    return out


def pointwise_ops() -> set:
    """Every aten overload torch tags `pointwise`: one rule covers the whole family."""
    found = set()
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        base, _, overload = name[len("aten::"):].partition(".")
        packet = getattr(aten, base, None)
        op = getattr(packet, overload or "default", None) if packet is not None else None
        if isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
            found.add(op)
    return found


# Elementwise ops torch does not tag `pointwise` (casts, copies, fills).
UNTAGGED = [aten._to_copy, aten.alias, aten.detach, aten.lift_fresh_copy, aten.copy, aten.fill,
            aten.masked_fill, aten.clone, aten.neg, CHECKPOINT_NAME]
ELEMENTWISE: frozenset = frozenset(pointwise_ops() | overloads(UNTAGGED))


def joins_component(node: torch.fx.Node) -> bool:
    """Whether `node` shares a layout hint with its same-shape operands."""
    return node.target in ELEMENTWISE or node.target is torch.ops.fp.constrain.default
