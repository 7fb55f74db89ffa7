"""How one collective sits in a lowered graph: to_front -> issue -> wait_tensor -> [from_front].

The schedule passes move, copy and merge these chains; this module finds them and names
their parts, so each pass reads as what it does to the chain.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import collectives
from ..pipelining import STAGE


@dataclass(eq=False)
class Chain:
    """The nodes of one collective; `result` is what its consumers read (wait or from_front)."""

    front: fx.Node
    issue: fx.Node
    wait: fx.Node
    result: fx.Node

    @property
    def record(self) -> dict:
        return self.issue.meta["fp_collective"]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def source(self) -> fx.Node:
        """The value the collective reads (before `to_front`); for a bucket, its first member's."""
        return self.sources[0]

    @property
    def sources(self) -> list[fx.Node]:
        """Every value the collective reads: one, or a bucket's members in order."""
        first = self.front.args[0]
        return list(first) if isinstance(first, (list, tuple)) else [first]

    @property
    def stream(self) -> tuple:
        """Collectives of one kind on one process group run one at a time, in program order (a
        pipeline stage's own: each stage's ranks run only their stages' collectives)."""
        return (self.kind, self.issue.args[-1], self.issue.meta.get(STAGE))

    def consumers(self) -> list[fx.Node]:
        """The nodes that read the result (through a bucket's per-member getitems)."""
        found = []
        for user in self.result.users:
            found.extend(user.users if user.target is operator.getitem else [user])
        return found

    @property
    def dim(self) -> int:
        return self.front.args[1]


def chains(graph: fx.Graph) -> list[Chain]:
    """Every collective chain, in program order of the issue."""
    found = []
    for node in graph.nodes:
        if "fp_collective" not in node.meta:
            continue
        wait = next(user for user in node.users if user.target is collectives.WAIT)
        result = next((user for user in wait.users if user.target in (collectives.from_front, collectives.unpack)),
                      wait)
        found.append(Chain(front=node.args[0], issue=node, wait=wait, result=result))
    return found


# Dtype casts a parameter may pass through before its gather: mixed precision casts the local shard
# to the compute dtype first, so that the all-gather moves low-precision bytes.
CASTS = {torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def is_parameter_gather(chain: Chain) -> bool:
    """An all-gather of a step input (a parameter stored sharded on the gathered axis), or of a dtype
    cast of one (its compute-dtype copy): gathering either again costs only the collective."""
    source = chain.source
    while source.op == "call_function" and source.target in CASTS and not source.kwargs.get("device"):
        source = source.args[0]
    return chain.kind == "all_gather" and source.op == "placeholder"


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


class Order:
    """Program positions that stay valid while nodes move, without renumbering the graph each time.

    A moved node takes the midpoint of its new neighbours' positions; only when a gap is used
    up is the graph renumbered (a pass that moves thousands of nodes stays linear in practice).
    """

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.renumber()

    def renumber(self) -> None:
        self.position = {node: float(i) for i, node in enumerate(self.graph.nodes)}

    def __getitem__(self, node: fx.Node) -> float:
        return self.position[node]

    def move_after(self, anchor: fx.Node, node: fx.Node) -> None:
        anchor.append(node)
        self._place(node)

    def move_before(self, anchor: fx.Node, node: fx.Node) -> None:
        anchor.prepend(node)
        self._place(node)

    def _place(self, node: fx.Node) -> None:
        low = self.position.get(node.prev, -1.0)
        high = self.position.get(node.next, float(len(self.position)))
        if high - low < 1e-6:
            self.renumber()
        else:
            self.position[node] = (low + high) / 2
