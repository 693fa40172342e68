"""Meshes and the logical axis rules: the package that names mesh axes.

``sharding.py`` holds the one rules table and the logical ``constrain`` (the only part of
this package the model uses); ``mesh.py`` sizes and builds the mesh; ``ring_attention.py``,
``splash_sharding.py`` and ``pipeline_parallel.py`` hold every ``shard_map``;
``distributed.py`` connects the processes of a multi-host run.
"""

from jaxformer.config.schema import MESH_AXES
from jaxformer.parallel.mesh import (
    check_dcn,
    make_mesh,
    resolve_mesh,
    resolve_mesh_shape,
    validate_mesh,
)
from jaxformer.parallel.ring_attention import ring_attention, sequence_sharded
from jaxformer.parallel.sharding import (
    DEFAULT_RULES,
    activate,
    batch_axes,
    batch_sharding,
    batch_shards,
    constrain,
    logical_to_sharding,
    logical_to_spec,
    tree_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "activate",
    "batch_axes",
    "batch_sharding",
    "batch_shards",
    "check_dcn",
    "constrain",
    "logical_to_sharding",
    "logical_to_spec",
    "make_mesh",
    "resolve_mesh",
    "resolve_mesh_shape",
    "ring_attention",
    "sequence_sharded",
    "tree_shardings",
    "validate_mesh",
]
