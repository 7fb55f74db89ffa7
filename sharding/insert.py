"""Stage 3, insert: copy the global graph, adding one collective (or local slice) per layout change.

Each (value, target layout) is redistributed once and shared by every consumer that needs it.
Only the mesh's axis names and sizes are read: this rank's position and the process groups are
placeholders that the last stage binds (`sharding.bind`).
Per axis: Shard->Replicate all-gather, Partial->Replicate all-reduce, Partial->Shard
reduce-scatter, Replicate->Shard local slice, Replicate->Partial local mask. Gathers run inner
axis first and slices outer axis first, so blocks split by several axes nest in mesh order.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from . import lazy
from . import collectives, ring_attention
from .bind import AxisGroup, RankIndex
from .random_ops import RANDOM_OPS, rank_seeded
from .layout import PARTIAL, REPLICATE, Layout, Strided, annotate, annotation, is_partial, nested_as_plain, split_dim
from .ops import facts
from .errors import PropagationError
from .phases import describe
from .source import source_line

aten = torch.ops.aten


def _exchanges(current, target, a) -> bool:
    """Axis `a` moves a plain split from one dim to another that no other axis splits."""
    if not (isinstance(current[a], int) and isinstance(target[a], int) and current[a] != target[a]):
        return False
    others = [p for b, p in enumerate(current) if b != a] + [p for b, p in enumerate(target) if b != a]
    return not any(split_dim(p) in (current[a], target[a]) for p in others)


def plan_steps(src: Layout, dst: Layout, axis_sizes=None) -> list[tuple[str, object, object]]:
    """The steps (kind, axis index, argument) that turn `src` into `dst`, one per axis, except that
    the all-reduces of one op over several axes are one step over their joint group: its axis
    index is a tuple and its argument the reduce op. A gather's argument is the placement it
    undoes, a slice's or reduce-scatter's the one it makes, an all-to-all's the (from, to) dims.
    With `axis_sizes`, an out-of-mesh-order nesting (`P(("tp", "dp"))`) whose inner axes stay is
    moved as the plain innermost split it is on every rank (`layout.nested_as_plain`)."""
    current, target = list(src.placements), list(dst.placements)
    n = len(current)
    as_plain = set()
    if axis_sizes is not None:
        for a in range(n):
            for layout in (current, target):
                plain = nested_as_plain(layout, a, axis_sizes)
                if plain is not None and all(current[b] == target[b] for b in range(a + 1, n)
                                             if split_dim(layout[b]) == plain):
                    layout[a] = plain
                    as_plain.add(a)
    changing = [a for a in range(n) if current[a] != target[a]]
    unshard = {a for a in changing if split_dim(current[a]) is not None}
    for a in set(changing) - as_plain:  # an inner axis nested in a dim an outer axis changes steps aside first
        dims = {split_dim(current[a]), split_dim(target[a])} - {None}
        for b in range(a + 1, n):
            if split_dim(current[b]) in dims:
                unshard.add(b)
    steps = []
    for a in sorted(unshard, reverse=True):
        if _exchanges(current, target, a):
            continue
        steps.append(("all_gather", a, current[a]))
        current[a] = REPLICATE
    for a in sorted(unshard, reverse=True):
        if _exchanges(current, target, a):  # Shard(i) -> Shard(j) on one axis: one all-to-all
            steps.append(("all_to_all", a, (current[a], target[a])))
            current[a] = target[a]
    for a in range(n):
        if current[a] == target[a]:
            continue
        if is_partial(current[a]):
            if is_partial(target[a]):
                raise ValueError(f"no collective turns {current[a]} into {target[a]}")
            if target[a] != REPLICATE:
                steps.append(("reduce_scatter", a, target[a]))
            else:
                joint = next((i for i, (kind, _, op) in enumerate(steps)
                              if kind == "all_reduce" and op == current[a].op), None)
                if joint is None:
                    steps.append(("all_reduce", (a,), current[a].op))
                else:
                    steps[joint] = ("all_reduce", steps[joint][1] + (a,), current[a].op)
        elif split_dim(target[a]) is not None:
            steps.append(("local_slice", a, target[a]))
        elif target[a] == PARTIAL:
            steps.append(("mask_partial", a, None))
        # Replicate -> Partial("max"/"min"): every rank's copy is already a candidate, no step.
        current[a] = target[a]
    return steps


class Inserter:
    def __init__(self, graph_module: fx.GraphModule, ctx, mesh):
        self.old = graph_module
        self.ctx = ctx
        self.mesh = mesh
        self.graph = fx.Graph()
        self.env: dict = {}
        self.cache: dict = {}

    def run(self) -> fx.GraphModule:
        for node in self.old.graph.nodes:
            found = annotation(node)
            requires = found.requires if found is not None else {}
            if node.op == "output":
                outputs = [self.get(out, requires.get(out), node) if isinstance(out, fx.Node) else out
                           for out in node.args[0]]
                self.graph.output(tuple(outputs))
                continue
            new = self.graph.node_copy(node, lambda arg: self.get(arg, requires.get(arg), node))
            new.meta.update(node.meta)
            if node.op == "call_function" and node.target in RANDOM_OPS:
                self._seed_by_block(node, new)
            if found is not None and "vocab_parallel" in found.local.values():
                self._vocab_parallel(node, new, requires)
            if found is not None and "ring_attention" in found.local.values():
                self._ring_attention(node, new, found, requires)
            self.env[node] = new
        return lazy.module(self.old, self.graph)

    def _seed_by_block(self, node: fx.Node, new: fx.Node) -> None:
        """A random op on a split value draws by this rank's block (`sharding.random_ops`)."""
        layout = self.ctx.layouts[node]
        split = tuple(a for a, p in enumerate(layout.placements) if split_dim(p) is not None)
        if split:
            new.args = (new.target, RankIndex(split), *new.args)
            new.target = rank_seeded

    def get(self, old: fx.Node, target, consumer: fx.Node) -> fx.Node:
        layout = self.ctx.layouts[old]
        if target is None or target == layout:
            return self.env[old]
        key = (old, target)
        if key not in self.cache:
            self.cache[key] = (self._gather_through_view(old, layout, target, consumer)
                               or self.redistribute(old, layout, target, consumer))
        return self.cache[key]

    def _ring_attention(self, node: fx.Node, new: fx.Node, found, requires: dict) -> None:
        """SDPA split on the sequence over one axis becomes the ring (`sharding.ring_attention`); its
        point-to-point traffic is logged like a collective (`fp_p2p`)."""
        axes = [axis for axis, local in found.local.items() if local == "ring_attention"]
        if len(axes) != 1:
            raise PropagationError(f"ring attention over several mesh axes at once ({axes}) is not supported "
                                   f"(at {source_line(node)}); split the sequence over one axis")
        (axis,) = axes
        size = self.mesh.axis_sizes[axis]
        backward = node.target is ring_attention.BACKWARD
        q_at = 1 if backward else 0
        operands, dropout, is_causal = ring_attention.arguments(node)
        query = node.args[q_at]
        striped = isinstance(requires.get(query, self.ctx.layouts[query]).placements[axis], Strided)
        new.target = ring_attention.ring_attention_backward if backward else ring_attention.ring_attention_forward
        new.args = (*new.args[:len(operands)], dropout, is_causal, node.kwargs.get("scale"), RankIndex((axis,)),
                    size, AxisGroup((axis,)), striped)
        new.kwargs = {}
        key = node.args[q_at + 1]
        key_layout = requires.get(key, self.ctx.layouts[key])
        local = key_layout.local_shape(key.meta["val"].shape, self.mesh.axis_sizes)
        kv_bytes = 2 * math.prod(local) * key.meta["val"].element_size()
        new.meta["fp_p2p"] = {
            "kind": "p2p", "axes": (self.mesh.axis_names[axis],),
            "bytes": ring_attention.bytes_sent(kv_bytes, size, backward),
            "shape": tuple(key.meta["val"].shape), "dtype": str(key.meta["val"].dtype).replace("torch.", ""),
            "value": key.name, "ring": "backward" if backward else "forward", **describe(key, node)}

    def _vocab_parallel(self, node: fx.Node, new: fx.Node, requires: dict) -> None:
        """A lookup, gather or scatter of whole indices into this rank's block of the indexed dim."""
        source = node.args[0]
        dim = 0 if node.target is aten.index.Tensor else node.args[1] % source.meta["val"].dim()
        layout = requires.get(source, self.ctx.layouts[source])
        axes = tuple(axis for axis, placement in enumerate(layout.placements) if split_dim(placement) == dim)
        count = math.prod(self.mesh.axis_sizes[axis] for axis in axes)
        start = RankIndex(axes, source.meta["val"].shape[dim] // count)  # this rank's first row
        if node.target is aten.index.Tensor:
            new.target, new.args = collectives.vocab_parallel_index, (new.args[0], new.args[1][0], start)
        elif node.target is aten.gather.default:
            new.target, new.args = collectives.vocab_parallel_gather, (new.args[0], dim, new.args[2], start)
        else:
            new.target, new.args = collectives.vocab_parallel_scatter, (new.args[0], dim, new.args[2], new.args[3], start)
            new.kwargs = {}

    def _gather_through_view(self, old: fx.Node, layout: Layout, target: Layout, consumer: fx.Node):
        """A chunked split made by a view and wanted whole is the view of its input gathered (one
        gather of the residual shared by the q, k and v views, no reorder), or None."""
        if old.op != "call_function" or not facts(old.target).moves_values or not isinstance(old.args[0], fx.Node):
            return None
        axes = [a for a, (have, want) in enumerate(zip(layout.placements, target.placements)) if have != want]
        if not axes or any(not isinstance(layout.placements[a], Strided) or target.placements[a] != REPLICATE
                           for a in axes):
            return None
        source = old.args[0]
        source_layout = self.ctx.layouts.get(source)
        if not isinstance(source_layout, Layout) or any(is_partial(source_layout.placements[a]) for a in axes):
            return None
        source_target = Layout(tuple(REPLICATE if a in axes else p for a, p in enumerate(source_layout.placements)))
        view = self.graph.call_function(old.target, (self.get(source, source_target, consumer), *old.args[1:]),
                                        dict(old.kwargs))
        view.meta.update(old.meta)
        annotate(view, target)
        return view

    def redistribute(self, old: fx.Node, src: Layout, dst: Layout, consumer: fx.Node) -> fx.Node:
        value = self.env[old]
        current = src
        described = describe(old, consumer)  # phase, leaf and the source line it is attributed to
        source = described["source"]
        global_val = old.meta["val"]
        for kind, axis, placement in plan_steps(src, dst, self.mesh.axis_sizes):
            every = axis if isinstance(axis, tuple) else (axis,)
            axes = tuple(a for a in every if self.mesh.axis_sizes[a] > 1)  # one rank: nothing to move
            if not axes:
                for a in every:
                    current = current.with_axis(a, dst.placements[a])
                continue
            before = current
            for a in every:  # a slice or reduce-scatter makes dst's placement (a nesting moved as plain too)
                current = current.with_axis(a, REPLICATE if kind in ("all_gather", "all_reduce") else
                                            PARTIAL if kind == "mask_partial" else
                                            placement[1] if kind == "all_to_all" else dst.placements[a])
            if kind in collectives.ISSUE_OPS:
                # Bytes per rank: what this rank sends (a gather's result is `size` times its input).
                local = (current if kind == "all_gather" else before).local_shape(global_val.shape,
                                                                                  self.mesh.axis_sizes)
                names = tuple(self.mesh.axis_names[a] for a in axes)
                ranks = math.prod(self.mesh.axis_sizes[a] for a in axes)
                record = {
                    "kind": kind, "axes": names,
                    "bytes": math.prod(local) * global_val.element_size(),
                    "shape": tuple(global_val.shape), "dtype": str(global_val.dtype).replace("torch.", ""),
                    "value": old.name, **described,
                }
                where = f"mesh axis {names[0]!r}" if len(names) == 1 else f"mesh axes {names} jointly"
                label = (f"over {where} ({ranks} ranks) of "
                         f"{old.name} (global shape {tuple(global_val.shape)}){', from ' + source if source else ''}")
                if kind == "all_to_all":
                    value = self._emit_all_to_all(axis, placement, value, local, record, label)
                else:
                    op = before.placements[axes[0]].op if is_partial(before.placements[axes[0]]) else "sum"
                    if op != "sum":
                        record["op"] = op
                    value = self._emit_collective(kind, axes, placement, value, record, label, op)
            else:
                value = self._emit_local(kind, axis, placement, value)
            value.meta["val"] = global_val
            annotate(value, current)
            if value.target is collectives.interleave:  # the collective's own result, before the reorder
                value.args[0].meta["val"] = global_val
                annotate(value.args[0], current)
        return value

    def _emit_collective(self, kind, axes, placement, value, record, label, op="sum"):
        """[deinterleave] -> to_front -> issue (carries the log record) -> wait -> from_front (dim > 0)
        -> [interleave]; the bracketed reorders only for a strided placement."""
        size = math.prod(self.mesh.axis_sizes[a] for a in axes)
        group = AxisGroup(tuple(axes))
        dim = split_dim(placement) or 0
        strided = isinstance(placement, Strided)
        if strided and kind == "reduce_scatter":
            value = self.graph.call_function(collectives.deinterleave, (value, dim, placement.chunks, size))
        front = self.graph.call_function(collectives.to_front, (value, dim))
        args = {"all_gather": (front, size, group), "reduce_scatter": (front, op, size, group),
                "all_reduce": (front, op, group)}[kind]
        issue = self.graph.call_function(collectives.ISSUE_OPS[kind], args)
        issue.meta["fp_collective"] = record
        wait = self.graph.call_function(collectives.WAIT, (issue, front, kind, label))
        result = self.graph.call_function(collectives.from_front, (wait, dim)) if dim else wait
        if strided and kind == "all_gather":
            result = self.graph.call_function(collectives.interleave, (result, dim, placement.chunks, size))
        return result

    def _emit_all_to_all(self, axis, dims, value, local: list[int], record, label):
        """pack (block i of the new dim for rank i) -> all_to_all_single -> wait -> join along the old dim."""
        size = self.mesh.axis_sizes[axis]
        group = AxisGroup((axis,))
        from_dim, to_dim = (int(d) for d in dims)
        block = list(local)
        block[to_dim] //= size
        front = self.graph.call_function(collectives.to_all_to_all, (value, to_dim, size))
        splits = [math.prod(local) // size] * size
        issue = self.graph.call_function(collectives.ISSUE_OPS["all_to_all"], (front, splits, splits, group))
        issue.meta["fp_collective"] = record
        wait = self.graph.call_function(collectives.WAIT, (issue, front, "all_to_all", label))
        return self.graph.call_function(collectives.from_all_to_all, (wait, from_dim, block, size))

    def _emit_local(self, kind, axis, placement, value):
        size = self.mesh.axis_sizes[axis]
        coordinate = RankIndex((axis,))
        if kind == "local_slice" and isinstance(placement, Strided):
            return self.graph.call_function(collectives.strided_slice,
                                            (value, placement.dim, placement.chunks, coordinate, size))
        if kind == "local_slice":
            return self.graph.call_function(collectives.local_slice, (value, int(placement), coordinate, size))
        return self.graph.call_function(collectives.mask_partial, (value, coordinate))


def insert(graph_module: fx.GraphModule, ctx, mesh) -> fx.GraphModule:
    return Inserter(graph_module, ctx, mesh).run()

