"""Meshes and the logical axis rules; the only place that names mesh axes."""

from jaxformer.parallel.ring_attention import ring_attention, sequence_sharded
from jaxformer.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    activate,
    batch_axes,
    batch_sharding,
    batch_shards,
    constrain,
    logical_to_sharding,
    logical_to_spec,
    make_mesh,
    tree_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "activate",
    "batch_axes",
    "batch_sharding",
    "batch_shards",
    "constrain",
    "logical_to_sharding",
    "logical_to_spec",
    "make_mesh",
    "ring_attention",
    "sequence_sharded",
    "tree_shardings",
]
