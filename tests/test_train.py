"""The pure train step: purity, traceability with make_fx on fake tensors, and learning on real data."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from functional_parallel import data, models, optim
from functional_parallel.train import make_eval_step, make_train_step
from functional_parallel.tree import tree_leaves, tree_map

ARCHS = ["gpt", "llama"]


def setup(arch: str, **overrides):
    model = models.build(arch, "tiny", **overrides)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0),
                            optim.adamw(optim.warmup_cosine_schedule(1e-2, 5, 50, init_value=1e-3), weight_decay=0.1,
                                        mask=optim.matrices_only))
    params = model.init(0)
    batch = data.get_batch("train", 0, 4, model.cfg.seq_len, seed=0)
    batch = {key: value % model.cfg.vocab_size for key, value in batch.items()}  # fit the tiny vocab
    return model, optimizer, params, optimizer.init(params), batch


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_is_pure(arch):
    model, optimizer, params, opt_state, batch = setup(arch)
    before = tree_map(torch.clone, (params, opt_state, batch))
    step = make_train_step(model.loss, optimizer)
    new_params, new_state, metrics = step(params, opt_state, batch)
    for a, b in zip(tree_leaves(before), tree_leaves((params, opt_state, batch))):
        assert torch.equal(a, b)
    assert set(metrics) == {"loss", "grad_norm"} and metrics["loss"].shape == () and metrics["grad_norm"].shape == ()
    torch.testing.assert_close(metrics["loss"], model.loss(params, batch))
    assert any(not torch.equal(a, b) for a, b in zip(tree_leaves(params), tree_leaves(new_params)))
    # the same inputs give the same outputs
    again = step(params, opt_state, batch)
    for a, b in zip(tree_leaves((new_params, new_state, metrics)), tree_leaves(again)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch,overrides", [("gpt", {}), ("gpt", {"fused_qkv": True}), ("llama", {})])
def test_train_step_traces_with_make_fx_fake(arch, overrides):
    """Guards what the compiler relies on: one flat aten graph, no data-dependent scalars."""
    model, optimizer, params, opt_state, batch = setup(arch, **overrides)
    step = make_train_step(model.loss, optimizer)
    graph = make_fx(step, tracing_mode="fake")(params, opt_state, batch)
    targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten._local_scalar_dense.default not in targets
    assert any("scaled_dot_product" in str(target) for target in targets)
    traced = graph(params, opt_state, batch)
    eager = step(params, opt_state, batch)
    for a, b in zip(tree_leaves(traced), tree_leaves(eager)):
        torch.testing.assert_close(a, b)


def test_train_step_traces_at_published_size_on_fake_tensors():
    """The planner's path: build a big model under FakeTensorMode and trace one layer of it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = models.build("llama", "llama2_70b", n_layers=1)
    optimizer = optim.adamw(1e-4)
    with FakeTensorMode() as mode:
        params = model.init(0, torch.bfloat16)
        opt_state = optimizer.init(params)
        tokens = torch.zeros(1, 128, dtype=torch.int64)
        batch = {"inputs": tokens, "targets": tokens}
        graph = make_fx(make_train_step(model.loss, optimizer), tracing_mode="fake")(params, opt_state, batch)
    assert len(graph.graph.nodes) > 100 and mode is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases_on_real_data(arch):
    dataset = data.load_dataset("pydoc")
    model = models.build(arch, "tiny", vocab_size=dataset.vocab_size, seq_len=32)
    optimizer = optim.adamw(optim.warmup_cosine_schedule(1e-2, 5, 50), weight_decay=0.0)
    params, opt_state = model.init(0), optimizer.init(model.init(0))
    step, evaluate = make_train_step(model.loss, optimizer), make_eval_step(model.loss)
    val_batch = dataset.get_batch("val", 0, 16, 32, seed=0)
    val_before = evaluate(params, val_batch).item()
    losses = []
    for i in range(50):
        params, opt_state, metrics = step(params, opt_state, dataset.get_batch("train", i, 16, 32, seed=0))
        losses.append(metrics["loss"].item())
    val_after = evaluate(params, val_batch).item()
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(dataset.vocab_size))).item(), abs=0.15)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert val_after < val_before - 1.0
