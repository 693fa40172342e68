"""The ``shard_map`` that runs a one-device attention kernel (splash) on a mesh.

The kernel is a custom call that the automatic partitioner would only replicate, so it
runs per device over the mesh axes that split the batch and the heads.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec

from jaxformer.parallel.sharding import _ACTIVE, DEFAULT_RULES, Rules, logical_to_spec


def shard_splash(
    local: Callable[..., jax.Array],
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    segment_ids_BxL: jax.Array,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> jax.Array:
    """``local(q, k, v, segment_ids)`` on each device's rows and heads; ``mesh``/``rules``
    default to the active ones. Raises ValueError where the length is split."""
    kv_heads = k_BxSxKxDh.shape[2]
    active = _ACTIVE.get()
    if mesh is None and active is not None:
        mesh = active[0]
    if rules is None:
        rules = active[1] if active is not None else DEFAULT_RULES
    if mesh is None:
        return local(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxL)

    q_spec = logical_to_spec(("batch", "length", "act_heads", None), q_BxLxHxDh.shape, mesh, rules)
    k_spec = logical_to_spec(
        ("batch", "length", "act_kv_heads", None), k_BxSxKxDh.shape, mesh, rules
    )
    if q_spec[1] is not None:
        raise ValueError(
            f"splash attention does not support sequence parallelism (length split over "
            f"{q_spec[1]!r}): ring attention runs instead when the length is split; set "
            "mesh.sequence=1 to use splash"
        )
    batch = q_spec[0]
    # Each device's query heads must find their KV heads among its own: split both over
    # the same axes, or (MQA) split the queries and give every device the one KV head;
    # otherwise every device computes all heads of its batch rows.
    if q_spec[2] == k_spec[2]:
        q_heads = kv_split = q_spec[2]
    elif kv_heads == 1:
        q_heads, kv_split = q_spec[2], None
    else:
        q_heads = kv_split = None
    q_spec = PartitionSpec(batch, None, q_heads, None)
    k_spec = PartitionSpec(batch, None, kv_split, None)
    # Every axis the caller has not already made manual (pipeline stages) goes manual:
    # the kernel is a custom call that the automatic partitioner would only replicate.
    # check_vma is off because the kernel's pallas_calls declare no varying axes on
    # their outputs; the specs hold anyway (inputs are replicated over unnamed axes).
    manual = {
        a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Manual
    }
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, k_spec, k_spec, PartitionSpec(batch, None)),
        out_specs=q_spec,
        axis_names=frozenset(mesh.axis_names) - manual,
        check_vma=False,
    )(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxL)
