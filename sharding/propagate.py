"""Stage 2, propagate: give every node a `Layout`, and every consumer the input layouts it needs.

The numbered rules docs/rules.md lists, in the order they apply:
0. An op whose tensor inputs are all replicated on a mesh axis runs unchanged there (no rule).
1. Inputs get their storage layout; `constrain` and `out_specs` are required layouts.
2. The data is every leaf of a data argument (`data_inputs`); an axis splitting it is a data axis.
3. A value that does not depend on the data and is sharded on a data axis is all-gathered over
   that axis before use (ZeRO-3), except by the elementwise ops of its own update.
4. Each op's rule (`sharding/rules`, one family per module) picks placements per mesh axis.
5. Conflicting splits: the data keeps its split on a data axis, the parameter on a model axis;
   anything else is an error naming the `constrain` (`rules.choose.anchor`).
6. A `Partial` that must be reduced is reduce-scattered if the value's *hint* is a shard (its
   elementwise component holds sharded state or a sharded constraint), all-reduced otherwise. One
   that forks (read by several ops) is reduced once, before its first use, not once per branch.
7. Each layout change is one collective per axis (`sharding.insert`; Shard(i) -> Shard(j) one
   all-to-all; a Partial over several axes one all-reduce over their joint group).
8. A layout that does not divide a tensor (output or required input) is an error.
9. No silent gather on a model axis: a split there is gathered only where rule 5 moves an
   operand, a reshape merges it behind a leading dim (rule 4), or a `constrain` asks; an op that
   needs the dim whole otherwise (softmax, layer norm, cumsum, sort over it) is an error naming
   the constrain (`_check_no_model_gather`).
The result is each node's `layout.Annotation` (`node.meta["fp"]`: layout, required input layouts, local computations).
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

from .constrain import decode_spec, keeps_other_axes
from .errors import PropagationError, SpecError
from .hints import Hints
from .layout import (PARTIAL, REPLICATE, Layout, Strided, annotate, describe, is_partial, is_shard, layout_from_spec,
                     nested_as_plain, split_dim)
from .ops import facts
from .rules import RULES, STRIDED_AWARE, Choice, load_all, tensor_inputs
from .source import source_line

load_all()


class Context:
    """What a rule may ask about the graph while the pass walks it."""

    def __init__(self, axis_names, axis_sizes, data_axes: Sequence[str], hints: Hints):
        self.axis_names = tuple(axis_names)
        self.axis_sizes = tuple(axis_sizes)
        self.data_axes = {self.axis_names.index(a) for a in data_axes}
        self.hints = hints
        self.layouts: dict[torch.fx.Node, object] = {}
        self.effective: dict[torch.fx.Node, Layout] = {}
        self.available: dict[torch.fx.Node, list[Layout]] = {}
        self.data_dependent: set[torch.fx.Node] = set()
        self.stated_gathers: set[tuple] = set()  # (node, axis): a stated rule moves an operand there

    # -- what rules ask -------------------------------------------------------------------
    def layout(self, node) -> Layout:
        return self.effective.get(node, self.layouts[node])

    def placement(self, node, axis: int):
        return self.layout(node).placements[axis]

    def shape(self, node) -> tuple:
        val = node.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else ()

    def ndim(self, node) -> int:
        return len(self.shape(node))

    def numel(self, node) -> int:
        val = node.meta.get("val")
        return val.numel() if isinstance(val, torch.Tensor) else 0

    def nbytes(self, node) -> int:
        val = node.meta.get("val")
        return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0

    def param_like(self, node) -> bool:
        return node not in self.data_dependent

    def is_data_axis(self, axis: int) -> bool:
        return axis in self.data_axes

    def hint(self, node, axis: int):
        return self.hints.placement(node, axis)

    def is_zeros(self, node) -> bool:
        return self.hints.is_zeros(node)

    def divisible(self, shape, dim: int, axis: int) -> bool:
        size = self.axis_sizes[axis]
        return dim < len(shape) and shape[dim] % size == 0 and shape[dim] >= size

    def gathers_by_rule(self, node, axis: int) -> None:
        """A rule moves an operand of `node` on `axis` by a stated rule (5, or 4's reshape
        clause): a gather there is not rule 9's error."""
        self.stated_gathers.add((node, axis))

    def error(self, node, message: str) -> PropagationError:
        where = source_line(node)
        return PropagationError(f"{message} (op {node.target}, node {node.name}"
                                + (f", at {where}" if where else "") + ")")


def is_integer(val) -> bool:
    return isinstance(val, torch.Tensor) and not val.is_floating_point() and not val.is_complex()


def propagate(graph: torch.fx.Graph, in_layouts: Sequence[Layout], out_layouts: Sequence[Layout],
              axis_names, axis_sizes, data_axes: Sequence[str] | None = None,
              data_inputs: Sequence[bool] | None = None) -> Context:
    """`data_inputs` says, per input leaf, whether it is data (the batch: tokens, masks, pixels);
    by default the integer leaves are. `data_axes` defaults to the axes that split a data input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if data_inputs is None:
        data_inputs = [is_integer(n.meta.get("val")) for n in placeholders]
    data_nodes = [n for n, is_data in zip(placeholders, data_inputs) if is_data]
    if data_axes is None:
        data_axes = [name for axis, name in enumerate(axis_names)
                     if any(split_dim(layout.placements[axis]) is not None
                            for node, layout in zip(placeholders, in_layouts) if node in data_nodes)]
    hints = Hints(graph, in_layouts, out_layouts, axis_names, axis_sizes)
    ctx = Context(axis_names, axis_sizes, data_axes, hints)
    ctx.data_dependent.update(data_nodes)
    for node, layout in zip(placeholders, in_layouts):
        ctx.layouts[node] = layout
        annotate(node, layout)
    for node in graph.nodes:
        if node.op == "call_function":
            _propagate_node(ctx, node)
        elif node.op == "get_attr":
            ctx.layouts[node] = Layout.replicated(len(axis_names))
            annotate(node, ctx.layouts[node])
        elif node.op == "output":
            outputs = node.args[0]
            annotate(node, None, {out: layout for out, layout in zip(outputs, out_layouts)
                                  if isinstance(out, torch.fx.Node)})
    return ctx


def _propagate_node(ctx: Context, node: torch.fx.Node) -> None:
    ctx.effective.clear()
    inputs = tensor_inputs(node)
    if any(i in ctx.data_dependent for i in inputs):
        ctx.data_dependent.add(node)
    if node.target is operator.getitem:
        parent, index = node.args
        ctx.layouts[node] = ctx.layouts[parent][index]
        annotate(node, ctx.layouts[node])
        return
    if node.target is torch.ops.fp.constrain.default:
        source, encoded = node.args
        spec = decode_spec(encoded)
        try:
            layout = layout_from_spec(spec, ctx.shape(source), ctx.axis_names, ctx.axis_sizes,
                                      where=f"constrain at {source_line(node) or node.name}")
        except SpecError as error:
            raise SpecError(f"{error}; a constrained dim must divide over its mesh axes: use a mesh whose "
                            f"sizes divide it, or map that dim's logical name (a model's heads, kv_heads, "
                            f"seq) to other mesh axes or to null in the strategy's logical rules") from None
        if keeps_other_axes(encoded):
            named = spec.all_axes()
            layout = Layout(tuple(p if ctx.axis_names[a] in named else ctx.placement(source, a)
                                  for a, p in enumerate(layout.placements)))
        _record(ctx, node, {source: layout}, layout)
        return
    rule_fn = RULES.get(node.target)
    _apply_compute_layouts(ctx, node, inputs)
    strided_inputs = {}
    if rule_fn not in STRIDED_AWARE:
        strided_inputs = {i: ctx.layout(i) for i in inputs
                          if isinstance(ctx.layouts.get(i), Layout) and ctx.layout(i).has_strided()}
    requires: dict[torch.fx.Node, list] = {}
    outputs = []
    local = {}
    for axis in range(len(ctx.axis_names)):
        if all(ctx.placement(i, axis) == REPLICATE for i in inputs):
            # Rule 0: an op whose tensor inputs are all replicated on an axis runs unchanged there.
            choice = Choice(_replicated_output(node))
        elif rule_fn is None:
            raise ctx.error(node, f"no sharding rule for op {node.target} with inputs laid out as "
                                  f"{_input_layouts(ctx, inputs)}; every op runs unchanged where its inputs "
                                  f"are replicated: constrain its inputs to P() on mesh axis "
                                  f"{ctx.axis_names[axis]!r}, or add a rule in sharding/rules")
        elif strided_inputs:
            choice = _as_plain_split(ctx, node, axis, rule_fn, strided_inputs)
        else:
            choice = rule_fn(ctx, node, axis)
        for inp in inputs:
            requires.setdefault(inp, []).append(choice.inputs.get(inp, ctx.placement(inp, axis)))
        outputs.append(choice.output)
        if choice.local is not None:
            local[axis] = choice.local
    required_layouts = {inp: Layout(tuple(pl)) for inp, pl in requires.items()}
    _check_no_model_gather(ctx, node, required_layouts)
    if outputs and isinstance(outputs[0], tuple):
        out_layout = tuple(Layout(tuple(o[i] for o in outputs)) for i in range(len(outputs[0])))
    else:
        out_layout = Layout(tuple(outputs))
    _record(ctx, node, required_layouts, out_layout, local)


def _check_no_model_gather(ctx: Context, node, required: dict) -> None:
    """Rule 9: a split on a model axis is gathered only where a stated rule moves an operand (5:
    the activation follows the parameter's split; 4: a reshape merges the split dim behind a
    leading one) or a `constrain` asks for it; any other gather is an error naming the constrain
    that makes it explicit."""
    for inp, layout in required.items():
        stored = ctx.layouts.get(inp)
        if not isinstance(stored, Layout):
            continue
        for axis, placement in enumerate(layout.placements):
            if (axis in ctx.data_axes or placement != REPLICATE or split_dim(stored.placements[axis]) is None
                    or (node, axis) in ctx.stated_gathers):
                continue
            name = ctx.axis_names[axis]
            held = describe(stored.placements[axis])
            current = stored.to_spec(ctx.ndim(inp), ctx.axis_names, ctx.axis_sizes)
            whole = stored.with_axis(axis, REPLICATE).to_spec(ctx.ndim(inp), ctx.axis_names, ctx.axis_sizes)
            raise ctx.error(node, f"this op needs its input {inp.name} whole on model axis {name!r}, where it "
                                  f"is {held} (layout {current}), and no rule computes it split; rule 9 "
                                  f"gathers on a model axis only where you ask: write "
                                  f"constrain(<{inp.name}>, {whole}) before this op to all-gather it over "
                                  f"{name!r}, or split a different dim of it")


def _as_plain_split(ctx: Context, node, axis: int, rule_fn, strided_inputs: dict) -> Choice:
    """A rule written for plain splits, applied where inputs are chunked on `axis`.

    The rule decides as if each chunked split were plain. Where it leaves that split in place and
    carries it to output dims of the same size (the op keeps positions along the dim: a row-wise
    max, a gather along another dim) or to no split at all (a Partial sum over the dim), the output
    is chunked alike and replicated operands are sliced to the same chunks; any other outcome (a
    local computation, a moved split) sees the chunked inputs whole instead: correct, at the price
    of a gather (rule 9 names it where it is one)."""
    chunked = {i: layout.placements[axis] for i, layout in strided_inputs.items()
               if isinstance(layout.placements[axis], Strided)}
    if not chunked:
        return rule_fn(ctx, node, axis)
    saved = {i: ctx.effective.get(i) for i in chunked}

    def decide(as_placement):
        for inp, placement in chunked.items():
            ctx.effective[inp] = ctx.layout(inp).with_axis(axis, as_placement(placement))
        try:
            if all(ctx.placement(i, axis) == REPLICATE for i in tensor_inputs(node)):
                return Choice(_replicated_output(node))
            return rule_fn(ctx, node, axis)
        finally:
            for inp, layout in saved.items():
                if layout is None:
                    ctx.effective.pop(inp, None)
                else:
                    ctx.effective[inp] = layout

    plain_elsewhere = any(is_shard(ctx.placement(i, axis)) for i in tensor_inputs(node) if i not in chunked)
    if len({p.chunks for p in chunked.values()}) == 1 and not plain_elsewhere:
        (chunks,) = {p.chunks for p in chunked.values()}
        carried = _rechunk(ctx, node, decide(lambda p: p.dim), chunked, chunks,
                           {ctx.shape(i)[p.dim] for i, p in chunked.items()})
        if carried is not None:
            return carried
    choice = decide(lambda p: REPLICATE)
    return Choice(choice.output, {**{i: REPLICATE for i in chunked}, **choice.inputs}, choice.local)


def _rechunk(ctx: Context, node, choice: Choice, chunked: dict, chunks: int, sizes: set) -> Choice | None:
    """`choice` (made for plain splits) with the chunked splits restored, or None where it does not
    carry them position for position. An output the rule does not split (a Partial sum or max over
    the dim, a metadata read) is the same for any split of the dim's positions."""
    if choice.local is not None or len(sizes) != 1:
        return None
    (size,) = sizes
    if any(choice.inputs.get(i, p.dim) != p.dim for i, p in chunked.items()):
        return None

    def restore(placement, shape):
        if not is_shard(placement):
            return placement
        if placement >= len(shape) or shape[placement] != size:
            raise _NotCarried
        return Strided(int(placement), chunks)

    try:
        outputs = choice.output
        if isinstance(outputs, tuple):
            shapes = [tuple(getattr(v, "shape", ())) for v in node.meta["val"]]
            output = tuple(restore(o, s) for o, s in zip(outputs, shapes))
        else:
            output = restore(outputs, ctx.shape(node))
        inputs = {inp: Strided(p.dim, chunks) for inp, p in chunked.items()}
        for inp, placement in choice.inputs.items():
            if inp not in chunked:
                inputs[inp] = restore(placement, ctx.shape(inp))
    except _NotCarried:
        return None
    return Choice(output, inputs)


class _NotCarried(Exception):
    pass


def _replicated_output(node):
    val = node.meta.get("val")
    return tuple(REPLICATE for _ in val) if isinstance(val, (list, tuple)) else REPLICATE


def _input_layouts(ctx: Context, inputs) -> str:
    return "; ".join(f"{i.name}: {ctx.layout(i).pretty(ctx.axis_names)}" for i in inputs
                     if isinstance(ctx.layouts.get(i), Layout))


def _apply_compute_layouts(ctx: Context, node, inputs) -> None:
    """The layouts this node sees its inputs in: a Partial already reduced (or used twice) is
    taken reduced, and rule 2 gathers data-axis shards of data-independent values (ZeRO-3)."""
    for inp in inputs:
        layout = ctx.layouts[inp]
        if not isinstance(layout, Layout):
            continue
        if any(is_partial(p) and p != PARTIAL for p in layout.placements):
            # A Partial max/min (a max over a split dim) is reduced before any use: no op is linear in it.
            ctx.effective[inp] = layout = Layout(tuple(REPLICATE if is_partial(p) and p != PARTIAL else p
                                                       for p in layout.placements))
        reduced = next((lay for lay in ctx.available.get(inp, ()) if not lay.has_partial()), None)
        if layout.has_partial() and reduced is not None:
            # Already reduced for an earlier consumer: reuse that copy rather than reduce again.
            ctx.effective[inp] = layout = reduced
        elif layout.has_partial() and _reads_values(inp) > 1:
            # Rule 6: a Partial that forks (read by several ops) is reduced once, before its first
            # use, for all of them, instead of once per branch (Megatron's one all-reduce per norm
            # backward; one reduction of a gradient that AdamW reads as g and g²), into its hinted
            # layout: a reduce-scatter for ZeRO, an all-reduce for DP.
            # A sum over the batch whose hinted shard one reduce-scatter cannot reach (its dim is
            # split by another axis already) stays Partial until a consumer needs it.
            if _reduces_as_hinted(ctx, inp, layout):
                ctx.effective[inp] = layout = _reduced(ctx, inp, layout, consumers=True)
            elif not any(layout.placements[a] == PARTIAL for a in ctx.data_axes):
                ctx.effective[inp] = layout = _reduced(ctx, inp, layout)
        if not ctx.param_like(inp):
            continue
        if ctx.hints.same_component(inp, node):
            continue
        placements = list(layout.placements)
        for axis in ctx.data_axes:
            if split_dim(placements[axis]) is not None:
                placements[axis] = REPLICATE
        if tuple(placements) != layout.placements:
            ctx.effective[inp] = Layout(tuple(placements))


def _reads_values(node) -> int:
    """How many ops read `node`'s values (not only its dtype or device)."""
    return sum(1 for user in node.users if not facts(user.target).metadata_only)


def _hint(ctx: Context, node, axis: int, consumers: bool):
    """The node's hinted placement. With `consumers`, a Replicate hint gives way to the first shard
    hinted by a same-shape consumer: a gradient that comes out of a view is not in the optimizer's
    component, its consumers are."""
    hint = ctx.hint(node, axis)
    if consumers and split_dim(hint) is None:
        hint = next((h for h in (ctx.hint(user, axis) for user in node.users
                                 if ctx.shape(user) == ctx.shape(node)) if split_dim(h) is not None), hint)
    return hint


def _reduces_as_hinted(ctx: Context, node, layout: Layout) -> bool:
    """True when every Partial of `layout` can be reduced straight into its hinted placement (not
    when the hinted shard's dim is already split by another axis: that one stays lazy)."""
    reduced = _reduced(ctx, node, layout, consumers=True)
    return all(reduced.placements[axis] == _hint(ctx, node, axis, consumers=True)
               for axis, placement in enumerate(layout.placements) if placement == PARTIAL)


def _reduced(ctx: Context, node, layout: Layout, consumers: bool = False) -> Layout:
    """`layout` with each Partial reduced: into the hinted shard where there is one, else replicated."""
    placements = list(layout.placements)
    for axis, placement in enumerate(placements):
        if placement == PARTIAL:
            hint = _hint(ctx, node, axis, consumers)
            reduced = list(placements)
            reduced[axis] = hint
            reachable = (is_shard(hint) and hint not in placements  # no other axis splits the dim
                         or nested_as_plain(reduced, axis, ctx.axis_sizes) is not None)  # or it nests in it
            shardable = reachable and ctx.divisible(ctx.shape(node), split_dim(hint), axis)
            placements[axis] = hint if shardable else REPLICATE
    return Layout(tuple(placements))


def _record(ctx: Context, node, requires: dict, out_layout, local=None) -> None:
    for inp in list(requires):
        if requires[inp] == ctx.layouts[inp]:
            del requires[inp]
    for inp, layout in requires.items():
        ctx.available.setdefault(inp, []).append(layout)
        if isinstance(layout, Layout):
            _check_divisible(ctx, inp, layout, consumer=node)
    ctx.layouts[node] = out_layout
    annotate(node, out_layout, requires, local)
    if isinstance(out_layout, Layout):
        _check_divisible(ctx, node, out_layout)


def _check_divisible(ctx: Context, node, layout: Layout, consumer=None) -> None:
    shape = ctx.shape(node)
    for dim, size in enumerate(shape):
        count = layout.shard_count(dim, ctx.axis_sizes)
        if size % count:
            what = f"input {node.name} of this op" if consumer is not None else "output"
            raise ctx.error(consumer if consumer is not None else node,
                            f"{what}: dim {dim} of size {size} cannot be split into {count} blocks "
                            f"(layout {layout.pretty(ctx.axis_names)}, shape {shape}); choose sizes "
                            f"divisible by the mesh axes or add a constrain")
