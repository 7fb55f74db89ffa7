"""Schedule pass: merge small collectives of one kind on one process group into one flat collective.

Members are taken in the order they are needed (gathers: by first use; reductions: by when
their input is ready) and added to the open bucket while it stays under `bucket_bytes`, all
share a dtype, every input is ready before any output is needed, and (gathers) no parameter is
in it twice (a re-gather must not join its forward gather). The bucket packs its members' flat
buffers (`collectives.pack`), issues one collective and splits the result (`collectives.unpack`).
Its log record is one entry: the summed bytes and the member records.

With `per_layer` (FSDP2's unit, one `fully_shard` per block), a bucket holds one layer's
parameters or gradients only: the leaves under one list element of an argument
(`params/blocks/3/...`); leaves outside any list (embeddings, final norm, head) are one unit per
argument; a value that is no leaf's (the loss) may join any bucket. Then ZeRO-3 gathers layer by
layer, the next one prefetched while one computes, and each layer's gradients are reduced as soon
as its backward is done.

A 0-dim sum all-reduce (the loss, a norm piece) rides in a reduce-scatter bucket over the same ranks
when the timing allows (the same ready-before-needed test): every rank's block carries a copy, so
each rank receives the sum, and the step issues one collective fewer (its bytes count g times, as
the reduce-scatter moves them). It joins the first such bucket in order of need.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from .. import collectives
from ..layout import layout_of
from ..pipelining import STAGE
from .chain import Chain, chains, positions

DEFAULT_BUCKET_BYTES = 25 * 2**20  # as DDP's default bucket


def _ready(chain: Chain, order: dict) -> int:
    return max(order[s] if s.op != "placeholder" else -1 for s in chain.sources)


def _need(chain: Chain, order: dict) -> int:
    return min(order[c] for c in chain.consumers())


def layer_of(record: dict) -> str | None:
    """The layer a collective's leaf belongs to: its path up to its first list index
    ("params/blocks/3"), else its argument ("params"); None for a value that is no leaf's."""
    leaf = record.get("leaf")
    if not leaf:
        return None
    parts = leaf.removeprefix("grad of ").split("/")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return "/".join(parts[:index + 1]) if index is not None else parts[0]


def _in_time(members: list[Chain], order: dict) -> bool:
    """Every member's input is ready before any member's result is needed (one collective can serve them)."""
    return max(_ready(c, order) for c in members) < min(_need(c, order) for c in members)


def _groups(stream: list[Chain], order: dict, bucket_bytes: int, dtype_of, per_layer: bool = False
            ) -> list[list[Chain]]:
    gathers = stream[0].kind == "all_gather"
    stream = sorted(stream, key=lambda c: (_need(c, order) if gathers else _ready(c, order), order[c.issue]))
    groups: list[list[Chain]] = []
    for chain in stream:
        current = groups[-1] if groups else None
        fits = current is not None and (
            sum(c.record["bytes"] for c in current) + chain.record["bytes"] <= bucket_bytes
            and dtype_of(chain) == dtype_of(current[0])
            and chain.issue.args[1:] == current[0].issue.args[1:]  # one reduce op (a max never joins sums)
            and _in_time(current + [chain], order)
            and not (gathers and chain.source in {c.source for c in current})
            and not (per_layer and len({layer_of(c.record) for c in current + [chain]} - {None}) > 1))
        if fits:
            current.append(chain)
        else:
            groups.append([chain])
    return groups


def _rides(chain: Chain, group: list[Chain], order: dict, dtype_of) -> bool:
    """Can the 0-dim all-reduce `chain` ride in the reduce-scatter bucket `group`?"""
    first = group[0]
    return (chain.issue.args[1] == first.issue.args[1] == "sum" and chain.issue.args[-1] == first.issue.args[-1]
            and chain.issue.meta.get(STAGE) == first.issue.meta.get(STAGE) and dtype_of(chain) == dtype_of(first)
            and _in_time(group + [chain], order))


def _take_riders(stream: list[Chain], scatters: list[list[Chain]], order: dict, dtype_of) -> list[Chain]:
    """Move each 0-dim all-reduce of `stream` that fits into the first reduce-scatter bucket (in order
    of need) it fits; the all-reduces left to bucket among themselves."""
    scatters = sorted(scatters, key=lambda g: min(_need(c, order) for c in g))
    left = []
    for chain in stream:
        host = None
        if chain.kind == "all_reduce" and chain.result.meta["val"].dim() == 0:
            host = next((g for g in scatters if _rides(chain, g, order, dtype_of)), None)
        if host is not None:
            host.append(chain)
        else:
            left.append(chain)
    return left


def _bytes_in(chain: Chain, bucket_kind: str, group_size: int) -> int:
    """What a member adds to its bucket's traffic: a riding all-reduce's value, once per rank's block."""
    riding = bucket_kind == "reduce_scatter" and chain.kind == "all_reduce"
    return chain.record["bytes"] * (group_size if riding else 1)


def _record(members: list[Chain]) -> dict:
    first = members[0].record
    size = members[0].issue.args[-2] if first["kind"] == "reduce_scatter" else 1
    return {"kind": first["kind"], "axes": first["axes"],
            "bytes": sum(_bytes_in(c, first["kind"], size) for c in members),
            "source": f"bucket of {len(members)}: {first['source']}", "shape": None, "dtype": first["dtype"],
            "value": "bucket", "regather": all(c.record.get("regather") for c in members),
            "phase": "+".join(dict.fromkeys(c.record.get("phase") or "forward" for c in members)), "leaf": None,
            "members": [c.record for c in members], **({"op": first["op"]} if "op" in first else {})}


def _result_shape(chain: Chain, axis_sizes) -> list[int]:
    """This rank's shape of the collective's result with its dim first (what `unpack` rebuilds)."""
    shape = layout_of(chain.result).local_shape(chain.result.meta["val"].shape, axis_sizes)
    if not shape:  # a 0-dim value (a loss or norm summand)
        return []
    return [shape[chain.dim]] + shape[:chain.dim] + shape[chain.dim + 1:]


def _merge(graph: fx.Graph, members: list[Chain], axis_sizes, order: dict) -> None:
    kind, first = members[0].kind, members[0].issue
    group_size = 1 if kind == "all_reduce" else first.args[-2]
    dims = [c.dim for c in members]
    shapes = [_result_shape(c, axis_sizes) for c in members]
    ready = max((s for c in members for s in c.sources if s.op != "placeholder"), key=order.__getitem__,
                default=[n for n in graph.nodes if n.op == "placeholder"][-1])
    need = min((consumer for c in members for consumer in c.consumers()), key=order.__getitem__)
    with graph.inserting_after(ready):
        pack = graph.call_function(collectives.pack, ([c.source for c in members], dims, group_size, kind))
    with graph.inserting_after(pack):
        issue = graph.call_function(first.target, (pack,) + tuple(first.args[1:]))
    issue.meta["fp_collective"] = _record(members)
    with graph.inserting_before(need):
        wait = graph.call_function(collectives.WAIT, (issue, pack, kind, issue.meta["fp_collective"]["source"]))
        unpack = graph.call_function(collectives.unpack, (wait, shapes, dims, group_size, kind))
        for index, chain in enumerate(members):
            item = graph.call_function(operator.getitem, (unpack, index))
            item.meta = dict(chain.result.meta)
            chain.result.replace_all_uses_with(item)
    if STAGE in first.meta:  # a pipeline's bucket runs on its members' stage
        for node in (pack, issue, wait, unpack, *unpack.users):
            node.meta[STAGE] = first.meta[STAGE]
    for chain in members:
        for node in dict.fromkeys((chain.result, chain.wait, chain.issue, chain.front)):
            graph.erase_node(node)


def bucket(graph_module: fx.GraphModule, axis_sizes, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
           per_layer: bool = False) -> fx.GraphModule:
    """Merge collectives into buckets of at most `bucket_bytes` (0: leave every collective alone),
    each within one layer when `per_layer`.

    `axis_sizes`: the mesh's, to read each member's local shape from its global value and layout.
    """
    if bucket_bytes <= 0:
        return graph_module
    graph = graph_module.graph
    streams: dict[tuple, list[Chain]] = {}
    for chain in chains(graph):
        if chain.kind != "all_to_all":  # an exchange's blocks are laid out per peer: not packed
            streams.setdefault(chain.stream, []).append(chain)
    order = positions(graph)
    dtype_of = lambda c: c.result.meta["val"].dtype  # noqa: E731
    groups = [group for stream in streams.values() if stream[0].kind != "all_reduce"
              for group in _groups(stream, order, bucket_bytes, dtype_of, per_layer)]
    scatters = [group for group in groups if group[0].kind == "reduce_scatter"]
    for stream in (s for s in streams.values() if s[0].kind == "all_reduce"):
        left = _take_riders(sorted(stream, key=lambda c: _ready(c, order)), scatters, order, dtype_of)
        groups += _groups(left, order, bucket_bytes, dtype_of, per_layer) if left else []
    groups = [group for group in groups if len(group) > 1]
    if not groups:
        return graph_module
    for group in groups:
        _merge(graph, group, axis_sizes, positions(graph))
    graph.lint()
    graph_module.recompile()
    return graph_module
