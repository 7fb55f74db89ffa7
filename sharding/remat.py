"""Activation checkpointing on the traced joint graph: choose which forward values backward keeps,
recompute the others in backward.

Runs right after `trace`, on the global graph of forward + backward + optimizer, before
`propagate`: a recomputed forward op is an op like any other, so it gets its layout and its
collectives from the same rules (a tensor-parallel all-reduce whose result the backward needs is
recomputed, as in Megatron's full recompute) and ZeRO-3's `regather` gives it a parameter gather
in the backward. No strategy has code here.

Forward and backward: the autograd seed of `torch.func.grad` is `ones_like` of the 0-dim
differentiated loss (one per micro-batch under gradient accumulation; the scaled loss under fp16
loss scaling). The forward is every ancestor of the seeds' inputs; the backward is every
descendant of a seed (the optimizer included). A forward value that a backward node reads is a
*saved activation*. Policies:

- `none`: nothing is recomputed (the `checkpoint_name` markers are removed).
- `full`: keep only the values named with `checkpoint_name` (the models name each block's input),
  the step's inputs and 0-dim values; every other saved activation is recomputed from the nearest
  kept values.
- `selective` (Korthikanti et al. 2022, section 4): recompute only the attention core (any SDPA op,
  softmax, dropout, batched matmuls of two activations such as QKᵀ and AV, and the elementwise
  ops between them); keep everything else (linear-layer, norm and activation-function inputs),
  except constants (a causal mask), which are made again. A kept view keeps its base, so an SDPA
  whose output feeds the output projection is kept whole: flash attention saves no s² tensors,
  and selective then changes nothing.

Copies are placed just before their first backward use, one copy per value per backward region
(the nodes after one seed and before the next), shared by that region's users. Random ops
(dropout masks) are never recomputed: recomputing them would draw a different mask.
"""
from __future__ import annotations

import bisect
import operator

import torch
import torch.fx as fx

from .checkpoint_name import CHECKPOINT_NAME
from .cost import VIEW_OPS
from .ops import REGISTRY
from .errors import RematError

aten = torch.ops.aten

POLICIES = ("none", "full", "selective")

# Ops that only move or re-type values: a matmul operand reached from a parameter through these
# alone is a weight, not an activation.
_PASS_THROUGH = frozenset(op for op, entry in REGISTRY.items() if entry.moves_values)
_SOFTMAX = frozenset(op for op, entry in REGISTRY.items() if entry.recompute == "softmax")
_DROPOUT = frozenset(op for op, entry in REGISTRY.items() if entry.recompute == "dropout")
_BATCHED_MATMUL = frozenset(op for op, entry in REGISTRY.items() if entry.recompute == "batched_matmul")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise RematError(f"remat must be one of {list(POLICIES)}, got {policy!r}")
    return policy


def remat(graph_module: fx.GraphModule, policy: str) -> fx.GraphModule:
    """Apply the activation-checkpointing `policy` to a traced joint graph (in place; returned)."""
    check_policy(policy)
    graph = graph_module.graph
    named = _remove_markers(graph)
    if policy != "none":
        seeds = backward_seeds(graph)
        if not seeds:
            raise RematError(f"remat={policy!r} needs a backward pass in the traced step, and none was found "
                             f"(no `ones_like` seed of a 0-dim loss, as `torch.func.grad` makes); "
                             f"use remat='none' for a step without gradients")
        forward = _ancestors([seed.args[0] for seed in seeds])
        stop = _kept_values(forward, named) if policy == "full" else _kept_outside_core(forward)
        _recompute(graph, seeds, forward, stop)
    if named or policy != "none":  # unchanged: no new code to generate
        graph.lint()
        graph_module.recompile()
    return graph_module


def _remove_markers(graph: fx.Graph) -> set[fx.Node]:
    """Drop every `checkpoint_name` node (rewiring its users to its input); return the named values."""
    named = set()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is CHECKPOINT_NAME:
            named.add(node.args[0])
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return named


def backward_seeds(graph: fx.Graph) -> list[fx.Node]:
    """The autograd seeds: `ones_like` of a 0-dim floating value, with users (the backward)."""
    seeds = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.ones_like.default and node.users:
            value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
                seeds.append(node)
    return seeds


def _closure(roots, step) -> set[fx.Node]:
    """`roots` and every node reached from them by `step` (a node -> its neighbours in one direction)."""
    found, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(step(node))
    return found


def _ancestors(roots) -> set[fx.Node]:
    return _closure(roots, lambda node: node.all_input_nodes)


def _descendants(roots) -> set[fx.Node]:
    return _closure(roots, lambda node: node.users)


def _random(node: fx.Node) -> bool:
    """An op that draws random numbers (dropout; an attention op only when its dropout_p is not 0)."""
    if not isinstance(node.target, torch._ops.OpOverload) or \
            torch.Tag.nondeterministic_seeded not in node.target.tags:
        return False
    names = [argument.name for argument in node.target._schema.arguments]
    if "dropout_p" in names:
        index = names.index("dropout_p")
        dropout_p = node.kwargs.get("dropout_p", node.args[index] if index < len(node.args) else 0.0)
        return dropout_p != 0
    return True


def _constants(forward: set[fx.Node]) -> set[fx.Node]:
    """Forward values computed from no step input at all (a causal mask, positions): cheap to make again."""
    inputs = {n for n in forward if n.op != "call_function"}
    from_inputs = _descendants(inputs)
    return {n for n in forward if n.op == "call_function" and n not in from_inputs}


def _with_storage_owners(nodes: set[fx.Node]) -> set[fx.Node]:
    """`nodes` plus what they alias: a kept view keeps its base, a kept `getitem` its op."""
    def owner(node: fx.Node) -> list[fx.Node]:
        aliases = node.op == "call_function" and (node.target in VIEW_OPS or node.target is operator.getitem)
        return [node.args[0]] if aliases and isinstance(node.args[0], fx.Node) else []

    return _closure(nodes, owner)


def _kept_values(forward: set[fx.Node], named: set[fx.Node]) -> set[fx.Node]:
    """`full`: the named values, the inputs, random ops and scalars (with what they alias). A scalar
    costs nothing to keep, and making one again can cost a reduction and its collective (the
    cross-entropy's token count, all-reduced over the data axes)."""
    kept = {n for n in forward if n.op != "call_function" or n in named or _random(n) or _scalar(n)}
    kept |= {n for n in forward if n.target is operator.getitem and n.args[0] in kept}
    return _with_storage_owners(kept)


def _scalar(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _is_weight(node: fx.Node) -> bool:
    """Computed from step inputs through views and casts alone (a parameter, not an activation)."""
    while node.op == "call_function" and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node.op != "call_function"


def _is_sdpa(node: fx.Node) -> bool:
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    name = node.target._schema.name.split("::")[-1]
    return "backward" not in name and ("scaled_dot_product" in name or name in (
        "_flash_attention_forward", "_efficient_attention_forward"))


def attention_core(forward: set[fx.Node]) -> set[fx.Node]:
    """The attention ops Korthikanti et al. recompute: SDPA, softmax, dropout, matmuls of two
    activations, and every node on a path between two of them through elementwise ops and views."""
    anchors = {n for n in forward if n.op == "call_function" and (
        _is_sdpa(n) or n.target in _SOFTMAX or n.target in _DROPOUT or (
            n.target in _BATCHED_MATMUL and not any(_is_weight(a) for a in n.args[:2] if isinstance(a, fx.Node))))}

    def between(node: fx.Node) -> bool:
        if node not in forward or node.op != "call_function":
            return False
        target = node.target
        return target is operator.getitem or target in _PASS_THROUGH or (
            isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)

    def reach(step) -> set[fx.Node]:
        found, stack = set(), [n for a in anchors for n in step(a)]
        while stack:
            node = stack.pop()
            if node not in found and node not in anchors and between(node):
                found.add(node)
                stack.extend(step(node))
        return found

    return anchors | (reach(lambda n: n.users) & reach(lambda n: n.all_input_nodes))


def _kept_outside_core(forward: set[fx.Node]) -> set[fx.Node]:
    """`selective`: every forward value outside the attention core (a random op's output is kept too),
    except constants, which are made again rather than kept (the causal mask an attention core reads)."""
    core = attention_core(forward) | _constants(forward)
    return _with_storage_owners({n for n in forward if n not in core or _random(n)})


def _recompute(graph: fx.Graph, seeds: list[fx.Node], forward: set[fx.Node], stop: set[fx.Node]) -> None:
    """Give each backward read of a forward value outside `stop` a recomputed copy (see module doc).

    The backward is what the seeds feed. Autodiff also emits nodes that feed it from forward values
    alone (`t` of a saved matmul input), sometimes before the seed: those are recomputed like
    forward values (and the originals dropped), so nothing is read across the seed through them.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    seed_positions = sorted(order[seed] for seed in seeds)
    backward = _descendants(seeds) - set(seeds)
    feeding = {n for n in _ancestors(backward) if n.op == "call_function" and n not in forward | backward
               and n not in seeds}
    recomputable = forward | feeding
    stop = set(stop)
    for node in sorted(feeding, key=order.__getitem__):  # feeding nodes that read only kept values stay
        if not any(n in recomputable and n not in stop for n in node.all_input_nodes):
            stop.add(node)
    copies: dict[tuple[int, fx.Node], fx.Node] = {}
    for user in sorted(backward, key=order.__getitem__):
        if user.op != "call_function":
            continue
        region = bisect.bisect_right(seed_positions, order[user]) - 1
        needed, stack = set(), [n for n in user.all_input_nodes if n in recomputable]
        while stack:  # the forward values this user needs that are neither kept nor already recomputed here
            node = stack.pop()
            if node in needed or node in stop or (region, node) in copies:
                continue
            needed.add(node)
            stack.extend(n for n in node.all_input_nodes if n in recomputable)
        for node in sorted(needed, key=order.__getitem__):
            with graph.inserting_before(user):
                copy = graph.node_copy(node, lambda arg: copies.get((region, arg), arg))
            copy.meta = {**node.meta, "fp_recomputed": True}
            copies[(region, node)] = copy
        for node in list(user.all_input_nodes):
            if (region, node) in copies:
                user.replace_input_with(node, copies[(region, node)])
    for node in reversed(list(graph.nodes)):  # originals no longer read (every node here is a pure op)
        if node in feeding and not node.users:
            graph.erase_node(node)
