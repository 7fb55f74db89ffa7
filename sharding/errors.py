"""One exception family for every sharding mistake: what was expected, what was got, where."""


class ShardingError(ValueError):
    """Base class: bad specs, meshes, or an op the propagation cannot place."""


class SpecError(ShardingError):
    """A PartitionSpec that does not fit its tensor or the mesh."""


class MeshError(ShardingError):
    """A mesh that does not fit the process group."""


class TraceError(ShardingError):
    """A function that cannot be traced on shapes alone (it reads a tensor's values in Python)."""


class PropagationError(ShardingError):
    """An op with no rule, or a layout choice the rules cannot settle."""


class RematError(ShardingError):
    """An activation-checkpointing policy that cannot be applied (unknown name, or no backward)."""


class CollectiveError(RuntimeError):
    """A collective that failed at run time (a peer died, hung past the timeout, or diverged)."""
