"""Activation checkpointing (`jit(..., remat=...)`): the same numbers, the collectives it recomputes,
and the memory it saves.

- 4 gloo ranks (one spawn): remat ∈ {full, selective} × {dp, zero3, tp_sp} equals the single-process
  reference (float64, 1e-9), and the predicted peak equals the measured one on the remat graphs.
- Abstract lowerings (no processes): ZeRO-3 still re-gathers under full remat; TP's forward
  all-reduces are recomputed.
- One process, `MemoryTracker`: what each policy keeps per layer, measured, against the shapes.
"""
from __future__ import annotations

import pytest
import torch

from functional_parallel import optim
from functional_parallel.launch import spawn
from functional_parallel.models import build
from functional_parallel.train import make_train_step
from functional_parallel.tree import tree_map
from sharding import Mesh, P, checkpoint_name, jit, unshard
from sharding.memory import MemoryTracker
from sharding.remat import RematError, backward_seeds
from sharding.trace import trace

from .equivalence import compile_strategy, max_error, measured_peaks, reference
from .lowered import lower

aten = torch.ops.aten
MATH = {"attention": "math"}  # the s² attention scores materialised, so selective has something to drop
STRATEGIES = ["dp", "zero3", "tp_sp"]
POLICIES = ["full", "selective"]
TOLERANCE = 1e-9
MEMORY_TOLERANCE = 0.05  # as tests/sharding/test_memory_peak.py
RUNS = 3


# --- 4 ranks: equivalence and predicted == measured peak ---------------------------------------

def _run_all(rank, world):
    results = {}
    for policy in POLICIES:
        for name in STRATEGIES:
            compiled, local = compile_strategy("gpt", name, MATH, remat=policy)
            mesh, pspecs = compiled.mesh, compiled.in_specs[0]
            lowered = compiled.lower(*local)
            p, s, losses, grads = local[0], local[1], [], None
            for _ in range(2):
                p, s, metrics = lowered.run(p, s, local[2])
                losses.append(metrics["loss"])
                grads = grads or unshard(metrics["grads"], pspecs, mesh)
            measured = measured_peaks(lowered, local, RUNS)
            results[(policy, name)] = {"losses": losses, "grads": grads, "params": unshard(p, pspecs, mesh),
                                       "predicted": lowered.cost["peak_bytes"], "measured": measured}
    return results


@pytest.fixture(scope="module")
def outcome():
    return reference("gpt", steps=2, model_overrides=MATH), spawn(_run_all, 4, timeout_s=400)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_remat_equals_reference(outcome, policy, strategy):
    ref, per_rank = outcome
    for rank, results in enumerate(per_rank):
        got = results[(policy, strategy)]
        assert torch.allclose(torch.stack(got["losses"]), torch.stack(ref["losses"]), rtol=0, atol=TOLERANCE)
        for what in ("grads", "params"):
            error, where = max_error(got[what], ref[what])
            assert error < TOLERANCE, f"{policy}/{strategy} rank {rank}: {what} {where} off by {error}"


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_predicted_peak_matches_measured(outcome, policy, strategy):
    for rank, results in enumerate(outcome[1]):
        got = results[(policy, strategy)]
        predicted, measured = got["predicted"], min(got["measured"])
        assert abs(predicted - measured) <= MEMORY_TOLERANCE * measured, (policy, strategy, rank, got)


# --- abstract lowerings: the collectives of the recomputation -----------------------------------

def _regathered(lowered) -> list[str]:
    return sorted(record["source"] for record in lowered.collectives if record.get("regather"))


def test_zero3_full_remat_still_regathers():
    """The recomputed forward reads the parameters in the backward, so ZeRO-3 gathers them there
    again (`regather`) instead of keeping the forward's copies: every re-gather of the plain step
    is still there, and each parameter is gathered again at least as often."""
    _, _, plain = lower("zero3", bucket_bytes=0)
    _, _, full = lower("zero3", bucket_bytes=0, remat="full")
    plain_sources, full_sources = _regathered(plain), _regathered(full)
    assert plain_sources and set(plain_sources) <= set(full_sources)
    assert all(full_sources.count(s) >= plain_sources.count(s) for s in set(plain_sources))


def _all_reduces(lowered, axis: str) -> list[str]:
    return [r["source"] for r in lowered.collectives if r["kind"] == "all_reduce" and r["axes"] == (axis,)]


def test_tp_full_remat_recomputes_forward_all_reduces():
    """Megatron TP all-reduces each row-parallel output (attention's wo, the MLP's w_out) in the
    forward. Full remat recomputes those whose results the backward reads: per layer the attention
    one (the second norm's input), and for the last layer also the MLP one (the final norm's input;
    every other MLP output is the next layer's kept input)."""
    model, _, plain = lower("tp", bucket_bytes=0)
    _, _, full = lower("tp", bucket_bytes=0, remat="full")
    extra = list(_all_reduces(full, "tp"))
    for source in _all_reduces(plain, "tp"):
        extra.remove(source)
    n_layers = model.cfg.n_layers
    assert len(extra) == n_layers + 1
    assert sum("_attention" in s for s in extra) == n_layers and sum("in _mlp" in s for s in extra) == 1
    assert _all_reduces(full, "dp") == _all_reduces(plain, "dp")  # the gradient reductions are unchanged


def test_sequence_parallel_gathers_norm_outputs_again_under_recompute():
    """Under SP each norm output is all-gathered on tp for the column matmuls and read again by their
    weight gradients. With recompute on, the backward gathers it again from the kept shard (Megatron's
    SP backward; Korthikanti's 2sbh/t for the QKV and MLP inputs) instead of keeping the gathered copy:
    two re-gathers per layer on tp, each the gathered [b/dp, s, h] activation; without recompute, none."""
    model, _, plain = lower("tp_sp", bucket_bytes=0)
    _, _, selective = lower("tp_sp", bucket_bytes=0, remat="selective")
    again = [r for r in selective.collectives if r.get("regather")]
    assert not [r for r in plain.collectives if r.get("regather")]
    cfg, local_batch = model.cfg, 8 // 2
    assert len(again) == 2 * cfg.n_layers
    assert all(r["kind"] == "all_gather" and r["axes"] == ("tp",)
               and r["bytes"] == local_batch * cfg.seq_len * cfg.d_model * 4 for r in again)
    assert sum("_attention" in r["source"] or 'p["wq"]' in r["source"] for r in again) == cfg.n_layers


# --- the pass's contract ------------------------------------------------------------------------

def test_bad_policy_and_missing_backward_fail_clearly():
    mesh = Mesh.abstract({"dp": 1})
    with pytest.raises(RematError, match=r"remat must be one of \['none', 'full', 'selective'\]"):
        jit(lambda x: x, mesh=mesh, in_specs=P(), out_specs=P(), remat="everything")
    no_backward = jit(lambda x: (x * 2).sum(), mesh=mesh, in_specs=P(), out_specs=P(), remat="full")
    with pytest.raises(RematError, match="needs a backward pass"):
        no_backward.lower(torch.ones(4))


def test_checkpoint_name_is_identity_outside_jit():
    x = torch.randn(3)
    assert checkpoint_name(x, "layer_input") is x


@pytest.mark.parametrize("grad_accum,precision", [(2, "fp32"), (1, "fp16")])
def test_one_seed_per_micro_batch(grad_accum, precision):
    """The backward seed is `ones_like` of the differentiated 0-dim loss: one per micro-batch, and
    under fp16 of the scaled loss."""
    from functional_parallel.precision import init_state

    model = build("gpt", "tiny", n_layers=1)
    optimizer = optim.sgd(0.1)
    step = make_train_step(model.loss, optimizer, grad_accum, precision)
    params, state = init_state(optimizer, model.init(0), step.precision)
    tokens = torch.zeros(4, model.cfg.seq_len, dtype=torch.long)
    args = (params, state, {"inputs": tokens, "targets": tokens})
    specs = tuple(tree_map(lambda _: P(), a) for a in args)
    graph = trace(step, args, specs, Mesh.abstract({"dp": 1})).graph_module.graph
    seeds = backward_seeds(graph)
    assert len(seeds) == grad_accum
    if precision == "fp16":
        assert seeds[0].args[0].target is aten.mul.Tensor  # loss * scale


# --- one process: what each policy keeps per layer, measured ------------------------------------

class BackwardStartTracker(MemoryTracker):
    """Also records the live bytes when the backward starts (the first `ones_like` seed runs):
    everything alive then is what the forward saved for the backward."""

    at_backward_start: int | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.ones_like.default and args[0].dim() == 0 and self.at_backward_start is None:
            self.at_backward_start = self.live_bytes
        return super().__torch_dispatch__(func, types, args, kwargs)


SHAPES = {"batch": 8, "seq": 32, "d_model": 32, "n_heads": 4}  # activations larger than one layer's params


def _measure(policy: str, attention: str, n_layers: int) -> dict:
    model = build("gpt", "tiny", n_layers=n_layers, seq_len=SHAPES["seq"], d_model=SHAPES["d_model"],
                  n_heads=SHAPES["n_heads"], attention=attention)
    params = model.init(0, dtype=torch.float64)
    tokens = torch.randint(0, model.cfg.vocab_size, (SHAPES["batch"], SHAPES["seq"] + 1),
                           generator=torch.Generator().manual_seed(0))
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    step = jit(torch.func.grad_and_value(model.loss), mesh=Mesh.abstract({"dp": 1}), in_specs=(P(), P()),
               out_specs=(P(), P()), remat=policy)
    lowered = step.lower(params, batch)
    saved, peaks = [], []
    for _ in range(2):
        with BackwardStartTracker() as mem:  # the step's inputs are not tracked: activations only
            out = lowered.run(params, batch)
        del out
        saved.append(mem.at_backward_start)
        peaks.append(mem.peak_bytes)
    return {"saved": min(saved), "peak": min(peaks)}


@pytest.fixture(scope="module")
def kept_per_layer():
    """Bytes kept for the backward per layer: saved(2 layers) - saved(1 layer), per (policy, attention)."""
    out = {}
    for attention in ("math", "sdpa"):
        for policy in ("none", "selective", "full"):
            one, two = _measure(policy, attention, 1), _measure(policy, attention, 2)
            out[(policy, attention)] = {"per_layer": two["saved"] - one["saved"], "peak": two["peak"]}
    return out


def test_full_keeps_one_layer_input_per_layer(kept_per_layer):
    """Korthikanti's 2sbh (16-bit) per layer is one residual-stream tensor: b·s·h elements. Exact: the
    layer input is the only per-layer value alive when the backward starts."""
    b, s, h = SHAPES["batch"], SHAPES["seq"], SHAPES["d_model"]
    for attention in ("math", "sdpa"):
        assert kept_per_layer[("full", attention)]["per_layer"] == b * s * h * 8


def test_selective_drops_exactly_the_attention_scores(kept_per_layer):
    """With the scores written out (attention="math"), none keeps the [b, a, s, s] softmax output per
    layer (Korthikanti's 5as²b in their accounting: scores, softmax, dropout); selective recomputes
    it and keeps everything else. With SDPA nothing s²-sized is kept to begin with."""
    b, s, a = SHAPES["batch"], SHAPES["seq"], SHAPES["n_heads"]
    none, selective = kept_per_layer[("none", "math")], kept_per_layer[("selective", "math")]
    assert none["per_layer"] - selective["per_layer"] == b * a * s * s * 8
    assert kept_per_layer[("selective", "sdpa")]["per_layer"] == kept_per_layer[("none", "sdpa")]["per_layer"]
    full = kept_per_layer[("full", "math")]
    assert none["per_layer"] > selective["per_layer"] > full["per_layer"]
    assert none["peak"] > selective["peak"] > full["peak"]  # the whole step's peak follows
