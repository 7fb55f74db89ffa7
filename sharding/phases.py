"""What each traced node is for: its phase, the forward line a backward node differentiates, and
the input leaf a value is (or is the gradient of), so the collective log can say
"backward · grad of params/blocks/0/attn/wq · gpt.py:141" instead of "train.py: return grad(...)".

While tracing, every `torch.autograd.grad` call (what `torch.func.grad`, `grad_and_value` and
`vjp` run) is intercepted: the nodes it creates are the backward, and each autograd node runs
with its sequence number set, so a backward node carries the number of the forward op it
differentiates (torch's own forward/backward correlation, as AOTAutograd uses it). After the
trace, a backward node gets that forward node's stack trace; nodes after the last backward node
are the optimizer; the rest are the forward.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.overrides import TorchFunctionMode

from .batched_matmul import FUNCTION_OPS
from .ops import facts
from .source import source_line

aten = torch.ops.aten

FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"


def _moves_values(node) -> bool:
    """A view, copy or cast (`ops.facts`): through it a value stays the same leaf, or its gradient."""
    return node.op == "call_function" and facts(node.target).moves_values


def _hook_sequence_numbers(roots) -> None:
    """Run each autograd node reachable from `roots` with its forward sequence number current."""
    seen, stack = set(), [root for root in roots if root is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)

        def enter(grad_outputs, number=node._sequence_nr()):
            fx_traceback.set_grad_fn_seq_nr(number)

        def leave(grad_inputs, grad_outputs):
            fx_traceback.reset_grad_fn_seq_nr()

        node.register_prehook(enter)
        node.register_hook(leave)


class _MarkBackward(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.autograd.grad:
            return func(*args, **kwargs)
        outputs = args[0] if args else kwargs["outputs"]
        outputs = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
        _hook_sequence_numbers([t.grad_fn for t in outputs if isinstance(t, torch.Tensor)])
        with fx_traceback._set_autograd_backward():
            return func(*args, **kwargs)


@contextlib.contextmanager
def recording_phases():
    """Trace under this so `annotate` can tell forward, backward and optimizer nodes apart."""
    with fx_traceback.preserve_node_meta(), _MarkBackward():
        yield


def _input_of(node, depth: int = 4):
    """The placeholder `node` is, through views and casts (or None)."""
    while depth >= 0 and isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node
        if not _moves_values(node):
            return None
        node, depth = node.args[0], depth - 1
    return None


def _shape(node):
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _gradient_leaf(node: fx.Node, forward: fx.Node | None, names: dict) -> str | None:
    """The input leaf whose gradient a backward node makes: an input of the forward op it
    differentiates, through views and casts, with the gradient's shape."""
    if forward is None:
        return None
    candidates = list(dict.fromkeys(
        p for p in map(_input_of, forward.all_input_nodes) if p in names and _shape(p) == _shape(node)))
    if len(candidates) == 1:
        return names[candidates[0]]
    if candidates and node.target is operator.getitem:
        # A backward op returns one gradient per input, in the inputs' order (layer norm: weight, bias).
        siblings = sorted((u for u in node.args[0].users if u.target is operator.getitem
                           and _shape(u) == _shape(node)), key=lambda u: u.args[1])
        if len(siblings) == len(candidates):
            return names[candidates[siblings.index(node)]]
    return None


def _same_gradient(node: fx.Node) -> str | None:
    """A gradient cast, scaled by a scalar or summed with itself stays that gradient."""
    tensors = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) not in (None, ())]
    if node.op != "call_function" or not tensors or any(_shape(a) != _shape(node) for a in tensors):
        return None
    leaves = {a.meta.get("grad_of") for a in tensors}
    if len(leaves) != 1 or None in leaves:
        return None
    if _moves_values(node) or node.target in (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor):
        return leaves.pop()
    return None


def forward_nodes(nodes: list) -> dict[int, fx.Node]:
    """Autograd sequence number -> the forward node it numbers (what a backward node's
    `meta["seq_nr"]` points at)."""
    forward_of: dict[int, fx.Node] = {}
    for node in nodes:
        if node.op == "call_function" and not node.meta.get("autograd_backward") and "seq_nr" in node.meta:
            forward_of.setdefault(node.meta["seq_nr"], node)
    for node in nodes:  # an op run inside an autograd.Function's forward is numbered one past the Function
        if node.target in FUNCTION_OPS and not node.meta.get("autograd_backward") and "seq_nr" in node.meta:
            forward_of.setdefault(node.meta["seq_nr"] - 1, node)
    return forward_of


def annotate(graph_module: fx.GraphModule, leaf_names: list[str]) -> None:
    """Set `meta["phase"]`, `meta["forward_stack_trace"]` (backward nodes), `meta["leaf"]`
    (inputs) and `meta["grad_of"]` (an input leaf's gradient) on every node."""
    nodes = list(graph_module.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    names = dict(zip(placeholders, leaf_names))
    for node, name in names.items():
        node.meta["leaf"] = name
    forward_of = forward_nodes(nodes)
    backward = [i for i, n in enumerate(nodes) if n.meta.get("autograd_backward")]
    last_backward = backward[-1] if backward else len(nodes)
    for index, node in enumerate(nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.meta.get("autograd_backward"):
            node.meta["phase"] = BACKWARD
            forward = forward_of.get(node.meta.get("seq_nr"))
            if forward is not None and forward.meta.get("stack_trace"):
                node.meta["forward_stack_trace"] = forward.meta["stack_trace"]
            else:  # autograd's own sum of a value's gradients (a tied weight): its first input's line
                traced = next((a for a in node.all_input_nodes if a.meta.get("forward_stack_trace")), None)
                if traced is not None:
                    node.meta["forward_stack_trace"] = traced.meta["forward_stack_trace"]
            node.meta["grad_of"] = _gradient_leaf(node, forward, names) or _same_gradient(node)
        else:
            node.meta["phase"] = OPTIMIZER if index > last_backward else FORWARD
            if backward and index > backward[0]:
                node.meta["grad_of"] = _same_gradient(node)


def describe(value: fx.Node, consumer: fx.Node) -> dict:
    """Phase, leaf and source line of a collective that moves `value` for `consumer` (nodes of the
    traced graph).

    A value needed by the forward or the backward is that consumer's phase and line (for a
    backward consumer, the forward line it differentiates); a gradient reduced for the optimizer
    is the backward's, at the line it is the gradient of. `leaf` is the input the value is
    ("params/wte"), or "grad of" the input it is the gradient of.
    """
    placeholder = _input_of(value)
    grad_of = value.meta.get("grad_of")
    phase = (consumer.meta.get("phase") if consumer.op != "output" else value.meta.get("phase")) or FORWARD
    needed_by_step = consumer.op != "output" and phase != OPTIMIZER
    source = source_line(consumer) if needed_by_step or value.op == "placeholder" else source_line(value)
    if phase == OPTIMIZER and (grad_of or value.meta.get("phase") == BACKWARD):
        phase = BACKWARD
    if placeholder is not None and "leaf" in placeholder.meta:
        leaf = placeholder.meta["leaf"]
    elif grad_of:
        leaf = f"grad of {grad_of}"
    else:
        leaf = None
    return {"phase": phase, "leaf": leaf, "source": source}
