"""Compiler stages tested alone on graphs of a few nodes: mincut, liveness, localize and rule 6 of
propagate (a Partial that forks is reduced once, before its first use)."""
from __future__ import annotations

import torch
import torch.fx as fx

from sharding import Mesh, P, jit, shard
from sharding.layout import Layout, annotate
from sharding.liveness import peak_bytes
from sharding.localize import localize
from sharding.mincut import FlowGraph


def test_minimum_cut_takes_the_cheaper_edges():
    # 0 -> 1 -> 3 and 0 -> 2 -> 3; the cheap edges are 1->3 (2) and 0->2 (1)
    flow = FlowGraph(4)
    for a, b, c in ((0, 1, 5), (1, 3, 2), (0, 2, 1), (2, 3, 7)):
        flow.add_edge(a, b, c)
    assert flow.source_side(0, 3) == {0, 1}


def test_liveness_peak_counts_what_is_alive_together():
    def fn(x):
        a = x * 2          # 4 KiB alive with x
        b = a + 1          # a dies after this: x, a, b alive here -> 12 KiB
        return b.sum()
    x = torch.zeros(1024)  # float32: 4 KiB
    graph_module = fx.symbolic_trace(fn)
    assert peak_bytes(graph_module, [x]) == 3 * 4096


def test_localize_rewrites_a_view_shape_to_local_sizes():
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(8, 6)
    view = graph.call_function(torch.ops.aten.view.default, (x, [8, 2, 3]))
    view.meta["val"] = torch.empty(8, 2, 3)
    annotate(view, Layout((0,)))
    graph.output((view,))
    localized = localize(fx.GraphModule(torch.nn.Module(), graph), (4,))
    node = next(n for n in localized.graph.nodes if n.target is torch.ops.aten.view.default)
    assert node.args[1] == [2, 2, 3]


def test_a_partial_needed_reduced_by_one_consumer_and_kept_by_another_is_reduced_once():
    """`h` is Partial over tp (a row-parallel product); tanh needs it whole, `h * 3` could keep it
    Partial and be reduced itself later. Reduced first: one all-reduce, not two."""
    mesh = Mesh.abstract({"tp": 2})

    def fn(x, w):
        h = x @ w
        return h * 3.0 + torch.tanh(h)  # the linear consumer first

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=g), torch.randn(8, 6, generator=g)
    step = jit(fn, mesh=mesh, in_specs=(P(None, "tp"), P("tp")), out_specs=P(), bucket_bytes=0)
    lowered = step.lower(shard(x, P(None, "tp"), mesh), shard(w, P("tp"), mesh))
    assert [c["kind"] for c in lowered.collectives] == ["all_reduce"]


def test_lowering_generates_the_graphs_code_once_and_keeps_user_source_lines(monkeypatch):
    """The stages rewrite the graph without regenerating its Python code (`sharding.lazy`): code is
    generated once, for the lowered step, which then runs; make_fx's stack traces still name the
    model's own lines (`sharding.source`)."""
    from functional_parallel.parallel import lower_abstract

    generated = []
    original = fx.Graph.python_code
    monkeypatch.setattr(fx.Graph, "python_code", lambda self, *a, **k: generated.append(self) or original(self, *a, **k))
    _, _, lowered = lower_abstract("gpt", "tiny", "zero3", {"dp": 4}, global_batch=8)
    assert generated == [lowered.graph.graph]
    assert "def forward" in lowered.graph.code
    sources = {record["source"].split(":")[0] for record in lowered.collectives}
    assert any(path.endswith("models/gpt.py") for path in sources), sources
