"""The compiler as a value: one list of stages, and the concrete mesh bound only by the last."""
import torch

from sharding import P, jit
from sharding.bind import AxisGroup, RankIndex, bind, placeholders
from sharding.mesh import Mesh
from sharding.pipeline import STAGES, run_stages


def _step(x, w):
    return torch.relu(x @ w)  # w split on columns over tp; the output is wanted split on rows over dp


def _program(mesh: Mesh):
    compiled = jit(_step, mesh=mesh, in_specs=(P(), P(None, "tp")), out_specs=P("dp"))
    args = (torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    lowered = compiled.lower(*args)
    return compiled, args, lowered


def test_the_stages_run_in_the_documented_order():
    assert [name for name, _ in STAGES] == ["trace", "remat", "propagate", "insert", "localize", "split", "schedule",
                                            "place", "bind"]


def test_every_stage_before_bind_is_the_same_program_on_every_rank():
    """Lowered for rank 0 and for rank 3 of a 2 x 2 mesh, the program before `bind` is the same
    code; it holds this rank's position and groups only as placeholders, which bind fills in."""
    unbound = {}
    for rank in (0, 3):
        compiled, args, _ = _program(Mesh.abstract({"dp": 2, "tp": 2}, rank=rank))
        unbound[rank] = run_stages(compiled.program(*args), STAGES[:-1])
    assert unbound[0].graph.code == unbound[3].graph.code
    found = placeholders(unbound[0].graph)
    assert AxisGroup((1,)) in found  # the all-gather of the column split over tp
    assert RankIndex((0,)) in found  # the slice of this rank's rows over dp

    slices = {}
    for rank in range(4):
        bound = bind(unbound[0].graph, Mesh.abstract({"dp": 2, "tp": 2}, rank=rank))
        assert placeholders(bound) == []
        slices[rank] = [n.args[2] for n in bound.graph.nodes if getattr(n.target, "__name__", "") == "local_slice"]
    assert slices == {0: [0], 1: [0], 2: [1], 3: [1]}  # the block index is the rank's dp coordinate


def test_jit_binds_the_mesh_it_was_given():
    _, _, lowered = _program(Mesh.abstract({"dp": 2, "tp": 2}, rank=2))
    assert placeholders(lowered.graph) == []
    assert [n.args[2] for n in lowered.graph.graph.nodes if getattr(n.target, "__name__", "") == "local_slice"] == [1]
    assert set(lowered.timings) >= {f"{name}_s" for name, _ in STAGES}



def test_a_bound_program_keeps_the_constants_it_closes_over_and_runs_as_its_rank():
    """No collective is needed to split a replicated value, so the bound program of rank 1 of an
    abstract mesh runs: it returns rank 1's rows, including the captured constant's."""
    offset = torch.arange(8, dtype=torch.float64).view(8, 1)  # a module buffer, say
    compiled = jit(lambda x: x + offset, mesh=Mesh.abstract({"dp": 2}, rank=1), in_specs=(P(),), out_specs=P("dp"))
    x = torch.zeros(8, 3, dtype=torch.float64)
    assert torch.equal(compiled(x), (x + offset)[4:])
