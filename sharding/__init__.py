"""sharding: a mesh, PartitionSpecs, and one compiler pass that inserts the collectives.

trace -> remat -> propagate -> insert -> localize -> split (a pipeline) -> schedule -> place (host/device memory kinds) -> bind
(the concrete mesh, last; `sharding.pipeline.STAGES`) -> run; `jit`
drives the pipeline, `Lowered` shows it.
"""
from .api import Lowered, jit
from .checkpoint_name import checkpoint_name
from .constrain import constrain
from .layout import Partial, Replicate, Shard, Strided
from .errors import CollectiveError, MeshError, PropagationError, RematError, ShardingError, SpecError, TraceError
from .mesh import Mesh
from .microbatch import microbatch
from .spec import P, Stage, chunked, striped
from .pipelining import Pipeline
from .tree import match, shard, unshard

__all__ = ["Mesh", "P", "Stage", "Pipeline", "microbatch", "chunked", "striped", "Shard", "Replicate", "Partial", "Strided", "match", "shard", "unshard", "constrain", "checkpoint_name", "jit", "Lowered",
           "ShardingError", "CollectiveError", "SpecError", "MeshError", "PropagationError", "RematError",
           "TraceError"]
