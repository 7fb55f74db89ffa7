"""Stage 1, trace: `fn` on fake tensors of *global* shape -> a flat aten `GraphModule`.

Local shapes times the spec's axis sizes give the global shapes; nothing is allocated. Composite
ops are decomposed with torch's own tables into the small core set the rules cover (`addmm` is
`mm` + `add`, `embedding` is `index`, a mean is sum / count so a sharded mean is a Partial sum
over the global count). Tensors `fn` closes over (module buffers such as rotary `inv_freq`)
become replicated constants; a matmul over several batch dims stays one op
(`sharding.batched_matmul`), so a head split is not merged behind the batch; values nothing uses
(an unused KV cache) are removed. Libraries
that ask whether they are being compiled are told "yes", so they skip data-dependent checks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optree
import torch
from torch._decomp import get_decompositions
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .batched_matmul import KeepBatchDims
from .constrain import tracing_context
from .phases import annotate, recording_phases
from .source import innermost_user_frame, source_line, user_stack_traces
from .errors import PropagationError, SpecError, TraceError
from .layout import Layout, layout_from_spec
from .mesh import Mesh
from .tree import NAMESPACE, flat_specs, leaf_paths

aten = torch.ops.aten



def _mean_dim(x, dim=None, keepdim=False, *, dtype=None):
    dims = list(range(x.dim())) if dim is None or (isinstance(dim, (list, tuple)) and not dim) else (
        [dim] if isinstance(dim, int) else list(dim))
    count = 1
    for d in dims:
        count *= x.shape[d]
    return aten.sum.dim_IntList(x, dims, keepdim, dtype=dtype) / count


def _mean(x, *, dtype=None):
    return _mean_dim(x, None, False, dtype=dtype)


# Composite ops traced as the core ops every rule family covers, taken from torch's own tables.
TORCH_DECOMPOSED = [
    aten.addmm, aten.addmv, aten.baddbmm, aten.addbmm,                       # mm + add
    aten.embedding, aten.embedding_dense_backward,                           # index / index_put
    aten._unsafe_masked_index_put_accumulate, aten._unsafe_index_put, aten._unsafe_index,
    aten.nll_loss_forward, aten.nll_loss_backward, aten.nll_loss2d_forward,  # gather / scatter
    aten._log_softmax, aten._log_softmax_backward_data, aten.logsumexp,  # max, exp, sum: split vocab works
]
DECOMPOSITIONS = {
    **get_decompositions(TORCH_DECOMPOSED),
    aten.mean.dim: _mean_dim,
    aten.mean.default: _mean,
}


@dataclass
class Traced:
    """The global-shape graph and what the later stages need to know about its inputs/outputs."""

    graph_module: torch.fx.GraphModule
    in_layouts: list[Layout]
    out_treedef: Any
    out_paths: list[str]


def argument_names(fn: Callable, count: int) -> list[str]:
    """`fn`'s positional parameter names ("params", "opt_state", "batch"), else "arg<i>"."""
    try:
        parameters = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters[:count]]
    return names + [f"arg{i}" for i in range(len(names), count)]


def input_layouts(args: tuple, in_specs: Sequence, mesh: Mesh, names: Sequence[str] | None = None):
    """Flatten the arguments and validate every leaf's spec against its global shape: the leaves,
    their layouts, global shapes and names ("params/blocks/0/attn/wq", argument names from `names`)."""
    if len(in_specs) != len(args):
        raise SpecError(f"in_specs has {len(in_specs)} entries but the function got {len(args)} arguments; "
                        f"give one spec (or spec tree) per argument")
    leaves, layouts, shapes, leaf_names = [], [], [], []
    for position, (arg, specs) in enumerate(zip(args, in_specs)):
        arg_paths, arg_leaves, _ = leaf_paths(arg)
        for path, leaf, spec in zip(arg_paths, arg_leaves, flat_specs(specs, arg, f"argument {position}")):
            argument = names[position] if names else f"arg{position}"
            leaf_names.append(f"{argument}/{path}" if path else argument)
            where = f"argument {position}" + (f" leaf {path!r}" if path else "")
            if not isinstance(leaf, torch.Tensor):
                raise SpecError(f"{where}: expected a tensor, got {type(leaf).__name__}")
            shape = mesh.global_shape(leaf.shape, spec)
            layouts.append(layout_from_spec(spec, shape, mesh.axis_names, mesh.axis_sizes, where=where))
            leaves.append(leaf)
            shapes.append(shape)
    return leaves, layouts, shapes, leaf_names


def _out_of_place(target):
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def remove_inplace(graph_module: torch.fx.GraphModule) -> None:
    """Rewrite in-place ops on temporaries (autograd formulas such as silu's backward write
    `empty_like(x).fill_(1).sub_(s)`) to their out-of-place forms, so every node is a value.
    The caller recompiles."""
    order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        functional = _out_of_place(node.target)
        if functional is None:
            continue
        mutated = node.args[0]
        if any(order[user] > order[node] for user in mutated.users if user is not node):
            raise PropagationError(f"in-place {node.target} on a tensor that is used again later "
                                   f"(at {source_line(node)}); write it out of place")
        node.target = functional


def trace(fn: Callable, args: tuple, in_specs: Sequence, mesh: Mesh, logical_rules=None,
          fake_device: torch.device | None = None) -> Traced:
    """`fake_device`: trace every input as if it were there (host-kind inputs are traced on the
    compute device; `sharding.placement` decides later what runs on host)."""
    leaves, layouts, shapes, leaf_names = input_layouts(args, in_specs, mesh, argument_names(fn, len(args)))
    arg_treedef = optree.tree_structure(tuple(args), namespace=NAMESPACE, none_is_leaf=False)
    out_info = {}

    def flat_fn(*flat):
        with KeepBatchDims():
            out = fn(*optree.tree_unflatten(arg_treedef, list(flat)))
        out_paths, out_leaves, out_treedef = leaf_paths(out)
        out_info.update(treedef=out_treedef, paths=out_paths)
        return tuple(out_leaves)

    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = [torch.empty(shape, dtype=leaf.dtype, device=fake_device or leaf.device)
                 for shape, leaf in zip(shapes, leaves)]
    with tracing_context(logical_rules, mesh.axis_names), user_stack_traces(), recording_phases(), \
            torch.compiler._compile_session_context():
        try:
            # Captured real tensors (module buffers) are allowed: they become get_attr constants.
            graph_module = make_fx(flat_fn, decomposition_table=DECOMPOSITIONS, tracing_mode="fake",
                                   record_stack_traces=True, _allow_non_fake_inputs=True)(*fakes)
        except DATA_DEPENDENT as error:
            raise data_dependent_error(error) from None
    remove_inplace(graph_module)
    graph_module.graph.eliminate_dead_code()
    annotate(graph_module, leaf_names)
    graph_module.recompile()
    return Traced(graph_module, layouts, out_info["treedef"], out_info["paths"])


DATA_DEPENDENT = (torch._subclasses.fake_tensor.DataDependentOutputException,
                  torch._subclasses.fake_tensor.DynamicOutputShapeException,
                  GuardOnDataDependentSymNode)


def data_dependent_error(error: Exception) -> TraceError:
    """The user's line that asked for a value only the data has, and the traceable ways around it."""
    where = innermost_user_frame(error.__traceback__)
    return TraceError(
        f"{where or 'the traced function'} needs a value that depends on the data ({type(error).__name__}: "
        f"{error}); a step is traced once on shapes, without values. Write it without reading tensor "
        f"values in Python: no `.item()`, `bool(tensor)`, `if tensor...:`, `tensor.nonzero()` or boolean-"
        f"mask indexing `x[mask]` (use torch.where(mask, x, 0)); give sizes explicitly "
        f"(F.one_hot(x, num_classes=V))")
