"""Layout hints: which shard a value would like, from the elementwise component it belongs to.

Values joined by same-shape elementwise ops (a gradient, the Adam moments updated from it, the
new parameter) form one component. Its hint on an axis is the shard that any input spec,
`out_spec` or `constrain` in it asks for, else Replicate. A `Partial` that must be reduced is
reduce-scattered into the hinted shard or all-reduced when the hint is Replicate — which is
what makes ZeRO-1/2 reduce-scatter gradients and DP all-reduce them, from specs alone.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .constrain import decode_spec
from .errors import ShardingError
from .layout import REPLICATE, Layout, layout_from_spec, split_dim
from .ops import creates_zeros, joins_component

aten = torch.ops.aten


class Hints:
    def __init__(self, graph: torch.fx.Graph, in_layouts: Sequence[Layout], out_layouts: Sequence[Layout],
                 axis_names: Sequence[str], axis_sizes: Sequence[int]):
        self.parent: dict = {}
        self.num_axes = len(axis_names)
        self.zeros: set = set()
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if creates_zeros(node):
                self.zeros.add(node)
            if joins_component(node):
                shape = _shape(node)
                for arg in node.args:
                    if isinstance(arg, torch.fx.Node) and _shape(arg) == shape:
                        self._union(arg, node)
        self.component_hint: dict = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node, layout in zip(placeholders, in_layouts):
            self._add_hint(node, layout)
        output = next(n for n in graph.nodes if n.op == "output")
        for node, layout in zip(output.args[0], out_layouts):
            if isinstance(node, torch.fx.Node):
                self._add_hint(node, layout)
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.fp.constrain.default:
                try:
                    self._add_hint(node, layout_from_spec(decode_spec(node.args[1]), _shape(node),
                                                          axis_names, axis_sizes))
                except ShardingError:
                    pass  # reported with its source line when propagation reaches the node

    def _find(self, node):
        root = node
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while node is not root:
            self.parent[node], node = root, self.parent.get(node, node)
        return root

    def _union(self, a, b) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def same_component(self, a, b) -> bool:
        return self._find(a) is self._find(b)

    def _add_hint(self, node, layout: Layout) -> None:
        root = self._find(node)
        current = list(self.component_hint.get(root, (None,) * self.num_axes))
        for axis, placement in enumerate(layout.placements):
            if split_dim(placement) is not None and split_dim(current[axis]) is None:
                current[axis] = placement
            elif current[axis] is None and placement == REPLICATE:
                current[axis] = REPLICATE
        self.component_hint[root] = tuple(current)

    def placement(self, node, axis: int):
        """The hinted placement of `node` on `axis`: a shard dim, REPLICATE, or None (no opinion)."""
        hint = self.component_hint.get(self._find(node))
        return None if hint is None else hint[axis]

    def is_zeros(self, node) -> bool:
        return node in self.zeros


def _shape(node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
