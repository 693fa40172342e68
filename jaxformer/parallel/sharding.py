"""Every sharding decision in jaxformer: the mesh, and the logical-to-mesh axis rules.

Model code names the axes of its parameters and activations logically (``embed``,
``mlp``, ``heads``, ``batch``...) and never mentions a mesh axis. This file maps those
names onto the mesh axes ``data``, ``fsdp`` and ``tensor`` through one rules table, so
changing a layout means changing this table or the mesh shape, not the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

# Parameters shard their ``embed`` dimension over fsdp (ZeRO-3 style: gathered per layer
# when used) and their ``heads``/``mlp``/``vocab`` dimensions over tensor (Megatron).
# Activations shard the batch over every data-like axis and keep ``act_embed`` whole.
DEFAULT_RULES: Rules = {
    # parameters
    # Pipeline parallelism: a stage holds num_layers / stage consecutive scanned layers.
    "layers": "stage",
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "positions": None,
    # MoE experts (parameters and the expert axis of dispatched activations): expert
    # parallelism. Outside the MoE layer the expert axis splits the batch like data does.
    "expert": "expert",
    # activations
    "batch": ("data", "fsdp", "expert"),
    # The group axis of MoE buffers dispatched to their experts: the batch less the expert
    # axis, which their expert dimension takes (the move between the two is an all-to-all).
    "dispatch_batch": ("data", "fsdp"),
    # Sequence (context) parallelism: activations split along their length; attention
    # passes K/V blocks around the ring (jaxformer/parallel/ring_attention.py).
    "length": "sequence",
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array, and a dimension its mesh axes do not
    divide is replicated instead: a tensor=8 mesh still runs a model with 4 KV heads.
    """
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(logical):
        axes = rules.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or (shape is not None and shape[dim] % size):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_to_sharding(
    logical: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules: Rules
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxformer_sharding", default=None
)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Makes :func:`constrain` place activations on ``mesh`` while tracing inside."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's layout by logical axis names; a no-op without a mesh."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(logical, x.shape, mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Layout of an input batch: the leading axis over the data-like mesh axes."""
    return logical_to_sharding(("batch",) + (None,) * (ndim - 1), None, mesh, rules)


def batch_axes(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The data-like mesh axes, those the ``batch`` rule splits the batch over: what the
    global batch must divide by, and what batch arithmetic (per-shard rows) counts."""
    axes = rules.get("batch")
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_shards(mesh_shape: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch is split: the product of the data-like axes' sizes."""
    return math.prod(int(mesh_shape.get(axis, 1)) for axis in batch_axes(rules))


def _is_variable(x: object) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def tree_shardings(tree: object, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> object:
    """NamedShardings for a pytree of NNX variables (params, optimizer moments) and arrays.

    A variable carries its logical axis names as ``out_sharding`` metadata; optimizer
    state derived from it (Adam moments) keeps them. Anything without names, or whose
    rank no longer matches them (Adafactor's factored moments), is replicated.
    """

    def one(leaf: object) -> object:
        if _is_variable(leaf):
            value = leaf.get_value()
            names = leaf.get_metadata().get("out_sharding")
            ndim = len(getattr(value, "shape", ()))
            if names is None or len(names) != ndim:
                names = (None,) * ndim
            return leaf.replace(logical_to_sharding(names, value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_variable)
