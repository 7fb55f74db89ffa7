"""Graph modules made while lowering generate their Python code once, when first run.

Every stage rewrites the graph and used to regenerate its code (`recompile`), which none of the
stages after it read: at 12 GPT layers that was a fifth of lowering. Inside `lazily()` a graph
module made by `make_fx` or by `module(root, graph)` defers its code until it is called or
printed, as torch's inductor passes do (`torch.fx._lazy_graph_module`; torch is pinned).
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module, _use_lazy_graph_module


def lazily():
    """Make graph modules lazy inside this context."""
    return _use_lazy_graph_module(True)


def module(root, graph: fx.Graph) -> fx.GraphModule:
    """`fx.GraphModule(root, graph)`, lazy inside `lazily()`."""
    return _make_graph_module(root, graph)


def generated(graph_module: fx.GraphModule) -> fx.GraphModule:
    """`graph_module` with its code generated now (the lowered step, before anyone runs or compiles it)."""
    _LazyGraphModule.force_recompile(graph_module)
    return graph_module
