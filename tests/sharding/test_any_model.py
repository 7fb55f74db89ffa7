"""A hand-written model of the ops real models use (a `triu` causal mask, `einsum`, `masked_fill`,
`F.linear` with bias, `F.embedding`, positions from `cumsum` of a float mask, `topk` routing with
`scatter`), none with a project-specific rule: every strategy on 4 gloo ranks equals one process."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from functional_parallel.launch import spawn
from sharding import Mesh, P, constrain, jit, shard, unshard

from .equivalence import assert_equals_reference

VOCAB, SEQ, BATCH, D, HEADS, EXPERTS = 32, 8, 12, 16, 4, 4
MESHES = {"dp": {"dp": 4, "tp": 1}, "zero3": {"dp": 4, "tp": 1}, "tp": {"dp": 2, "tp": 2},
          "tp_sp": {"dp": 2, "tp": 2}, "fsdp_tp": {"dp": 2, "tp": 2}}
LOGICAL = {"batch": "dp", "seq": "tp"}  # seq: tp only under tp_sp (Megatron's sequence parallelism)
TOLERANCE = 1e-9


def init():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2
    return {"embed": rand(VOCAB, D), "pos": rand(SEQ, D), "wq": rand(D, D), "bq": rand(D), "wk": rand(D, D),
            "bk": rand(D), "wv": rand(D, D), "bv": rand(D), "wo": rand(D, D), "bo": rand(D),
            "router": rand(D, EXPERTS), "experts": rand(EXPERTS, D, D)}


def batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).to(torch.float64)
    mask[:, 0] = 1.0
    return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(), "mask": mask}


def loss(params, batch):
    mask = batch["mask"]                                             # [b, s] float: 1 = real token
    positions = (mask.cumsum(-1) - 1).clamp(min=0).long()           # as GPT-NeoX and HF derive them
    h = F.embedding(batch["tokens"], params["embed"]) + F.embedding(positions, params["pos"])
    h = constrain(h, ("batch", "seq", "embed"))                     # the residual stream's logical axes
    b, s, d = h.shape
    heads = lambda x: x.view(b, s, HEADS, d // HEADS).transpose(1, 2)
    q = heads(F.linear(h, params["wq"], params["bq"]))
    k = heads(F.linear(h, params["wk"], params["bk"]))
    v = heads(F.linear(h, params["wv"], params["bv"]))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d // HEADS)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    attention = torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(causal, float("-inf")).softmax(-1), v)
    h = constrain(h + F.linear(attention.transpose(1, 2).reshape(b, s, d), params["wo"], params["bo"]),
                  ("batch", "seq", "embed"))
    route = h @ params["router"]                                     # [b, s, e]
    top, chosen = route.topk(2, dim=-1)
    gates = torch.zeros_like(route).scatter(-1, chosen, top.softmax(-1))
    h = h + torch.einsum("bse,bsed->bsd", gates, torch.einsum("bsd,edf->bsef", h, params["experts"]))
    h = constrain(h, ("batch", "seq", "embed"))
    logits = F.linear(h, params["embed"])
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), batch["targets"].reshape(-1), reduction="none")
    return (per_token * mask.reshape(-1)).sum() / mask.sum()


def specs(strategy: str, params) -> dict:
    tp = strategy in ("tp", "tp_sp", "fsdp_tp")
    column, row = {"wq", "wk", "wv"}, {"wo"}
    out = {}
    for name, p in params.items():
        entries = [None] * p.dim()
        if tp and name in column | {"bq", "bk", "bv"}:
            entries[0] = "tp"                                        # F.linear weights are [out, in]
        elif tp and name in row:
            entries[1] = "tp"
        if strategy in ("zero3", "fsdp_tp"):
            free = next((d for d in range(p.dim()) if entries[d] is None), None)
            if free is not None:
                entries[free] = "dp"
        out[name] = P(*entries)
    return out


grad_and_value = torch.func.grad_and_value(loss)


def step(params, batch):
    grads, value = grad_and_value(params, batch)
    return value, grads


def lower(strategy: str, mesh: Mesh, **jit_options):
    params, data = init(), batch()
    pspecs = specs(strategy, params)
    logical = LOGICAL if strategy == "tp_sp" else {"batch": "dp"}
    compiled = jit(step, mesh=mesh, in_specs=(pspecs, P("dp")), out_specs=(P(), pspecs), logical_rules=logical,
                   **jit_options)
    local = (shard(params, pspecs, mesh), shard(data, P("dp"), mesh))
    return compiled.lower(*local), local, pspecs


def run(strategy: str, mesh: Mesh):
    lowered, local, pspecs = lower(strategy, mesh)
    value, grads = lowered.run(*local)
    return value, unshard(grads, pspecs, mesh), lowered.collectives


def _all(rank, world):
    return {name: run(name, Mesh(shape))[:2] for name, shape in MESHES.items()}


@pytest.fixture(scope="module")
def per_rank():
    return spawn(_all, 4, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(MESHES))
def test_hand_written_model_equals_reference(per_rank, strategy):
    ref_loss, ref_grads = step(init(), batch())
    assert_equals_reference([results[strategy] for results in per_rank], ref_loss, ref_grads, TOLERANCE, strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(MESHES))
def test_a_float_mask_in_the_batch_is_data_not_a_parameter(strategy):
    """The float mask is split over dp like the tokens and never all-gathered (it is data)."""
    collectives = lower(strategy, Mesh.abstract(MESHES[strategy]), bucket_bytes=0)[0].collectives
    mask_shape = (BATCH, SEQ)
    assert not [c for c in collectives if c["kind"] == "all_gather" and c["shape"] == mask_shape]
    assert not [c for c in collectives if c["axes"] == ("dp",) and c["kind"] == "all_gather"
                and c["shape"][:1] == (BATCH,)], "an activation was gathered over the data axis"


def test_data_argnums_makes_a_float_only_input_data():
    """Pixels (no integer leaf anywhere): `data_argnums` says they are data, so dp is a data axis and
    the ZeRO-3 weight is gathered (not the pixels)."""
    def image_loss(w, pixels):
        return torch.tanh(pixels @ w).sum()

    mesh = Mesh.abstract({"dp": 4})
    w, pixels = torch.ones(8, 4, dtype=torch.float64), torch.ones(16, 8, dtype=torch.float64)
    compiled = jit(image_loss, mesh=mesh, in_specs=(P("dp"), P("dp")), out_specs=P(), data_argnums=1)
    collectives = compiled.lower(w[:2], pixels[:4]).collectives
    gathered = [c["shape"] for c in collectives if c["kind"] == "all_gather"]
    assert gathered == [(8, 4)], gathered
