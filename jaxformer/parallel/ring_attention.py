"""Sequence (context) parallelism: ring attention over the mesh axis that ``length`` maps to.

Every device of the ``sequence`` axis holds one contiguous block of each row's tokens (its
queries, keys and values, segment ids and positions). Attention keeps the queries in place
and passes the key/value blocks around the ring with ``ppermute``: after n - 1 hops every
query block has met every key block, and no device ever holds more than two K/V blocks
or a mask bigger than one block pair. Each block's mask is built on the spot from the
segment ids and positions that travel with its keys, and the blocks are combined by an
online (flash-style) softmax in float32, so the result equals one device's attention.

The model never calls this: the attention backend that ``jaxformer.attention.registry``
selects for a sequence-parallel mesh does, for self-attention over a ``SegmentMask``
whose length :func:`sequence_sharded` says the active rules split.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxformer.parallel.sharding import (
    _ACTIVE,
    DEFAULT_RULES,
    MeshAxes,
    Rules,
    logical_to_spec,
)

# (query segment ids, causal, *, key_segment_ids_BxS, positions_BxL, key_positions_BxS,
# window) -> [B, L, S] bool: the mask of one query block against one key block.
MaskFn = Callable[..., jax.Array]

NEG_INF = -1e30  # the reference's masked logit: finite, so fully masked rows stay finite


def _length_axes(length: int, mesh: Mesh, rules: Rules) -> MeshAxes:
    """The mesh axes a ``length``-long activation dimension is split over (None: whole)."""
    return logical_to_spec(("length",), (length,), mesh, rules)[0]


def sequence_sharded(length: int) -> bool:
    """Whether the active rules split activations of this length over a mesh axis, so
    self-attention must pass K/V blocks between devices instead of seeing the whole row."""
    active = _ACTIVE.get()
    return active is not None and _length_axes(length, *active) is not None


def ring_attention(
    q_BxLxHxDh: jax.Array,
    k_BxLxKxDh: jax.Array,
    v_BxLxKxDh: jax.Array,
    segment_ids_BxL: jax.Array,
    positions_BxL: jax.Array,
    bias_BxHxLxL: jax.Array | None = None,
    *,
    causal: bool,
    window: int = 0,
    scale: float,
    block_mask: MaskFn,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> jax.Array:
    """Self-attention with the length split over the mesh, equal to ``dot_product_attention``
    with ``attention_mask(segment_ids, causal, positions_BxL=positions, window=window)``.

    Keys are the queries' own tokens (self-attention: one ``segment_ids``/``positions``).
    ``bias_BxHxLxL`` (an additive logit bias such as ALiBi's; batch dimension 1 or B)
    is split by query rows like the queries and sliced per key block; it costs
    O(H L^2 / n) memory per device, which the masks built from positions avoid.
    ``block_mask`` is the mask rule (``jaxformer.attention.masks.attention_mask``'s
    signature), applied to each pair of blocks with the ids and positions that travel
    with the keys. ``mesh``/``rules`` default to the active ones (``parallel.activate``).
    Query rows with no key to attend to (padding) get a finite output that differs from
    the reference's; nothing reads them.
    """
    active = _ACTIVE.get()
    if mesh is None:
        if active is None:
            raise ValueError("ring_attention needs a mesh: pass mesh= or use parallel.activate")
        mesh = active[0]
    if rules is None:
        rules = active[1] if active is not None else DEFAULT_RULES
    b, length, h, _ = q_BxLxHxDh.shape
    kv = k_BxLxKxDh.shape[2]
    if k_BxLxKxDh.shape[1] != length or h % kv:
        raise ValueError(
            f"ring attention is self-attention with grouped heads: q {q_BxLxHxDh.shape}, "
            f"k {k_BxLxKxDh.shape}"
        )
    q_spec = logical_to_spec(("batch", "length", "act_heads", None), q_BxLxHxDh.shape, mesh, rules)
    k_spec = logical_to_spec(
        ("batch", "length", "act_kv_heads", None), k_BxLxKxDh.shape, mesh, rules
    )
    axis = q_spec[1]
    if axis is None:
        raise ValueError(
            f"length {length} is not split over a mesh axis (rules 'length' -> "
            f"{rules.get('length')!r}, mesh {dict(mesh.shape)}; an axis that does not divide "
            "the length leaves it whole): nothing for a ring to do"
        )
    # Query heads and their KV heads are split together or not at all, so each device's
    # query heads find their group's KV head among its own.
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    q_spec = PartitionSpec(q_spec[0], axis, heads, None)
    row_spec = PartitionSpec(q_spec[0], axis)
    bias_spec = None
    if bias_BxHxLxL is not None:
        if bias_BxHxLxL.shape[1:] != (h, length, length):
            raise ValueError(f"bias {bias_BxHxLxL.shape} is not [B or 1, H, L, L] {h, length}")
        bias_batch = q_spec[0] if bias_BxHxLxL.shape[0] == b else None
        bias_spec = PartitionSpec(bias_batch, heads, axis, None)
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    n = math.prod(mesh.shape[a] for a in names)
    block = functools.partial(
        _ring_block, axis=axis, n=n, causal=causal, window=window, scale=scale,
        block_mask=block_mask,
    )  # fmt: skip
    return jax.shard_map(
        block,
        mesh=mesh,
        in_specs=(q_spec, q_spec, q_spec, row_spec, row_spec, bias_spec),
        out_specs=q_spec,
    )(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, positions_BxL, bias_BxHxLxL)


def _ring_block(
    q_BxCxHxDh: jax.Array,
    k_BxCxKxDh: jax.Array,
    v_BxCxKxDh: jax.Array,
    segment_ids_BxC: jax.Array,
    positions_BxC: jax.Array,
    bias_BxHxCxL: jax.Array | None,
    *,
    axis: MeshAxes,
    n: int,
    causal: bool,
    window: int,
    scale: float,
    block_mask: MaskFn,
) -> jax.Array:
    """One device's share (C = L / n of each row): its queries against every K/V block,
    the blocks arriving one hop at a time from the previous device of the ring."""
    b, c, h, dh = q_BxCxHxDh.shape
    kv = k_BxCxKxDh.shape[2]
    g = h // kv
    q_BxCxKxGxDh = q_BxCxHxDh.reshape(b, c, kv, g, dh)
    me = jax.lax.axis_index(axis)

    def attend(carry: tuple, kv_block: tuple, mask_BxCxC: jax.Array, hops: jax.Array) -> tuple:
        """Folds one K/V block (from the device ``hops`` places back) into the online
        softmax: running max m, running sum l, unnormalised output acc, all float32."""
        m_BxKxGxC, l_BxKxGxC, acc_BxKxGxCxDh = carry
        k_blk, v_blk = kv_block[0], kv_block[1]
        s_BxKxGxCxC = (
            jnp.einsum("bckgd,bskd->bkgcs", q_BxCxKxGxDh, k_blk, preferred_element_type=jnp.float32)
            * scale
        )
        if bias_BxHxCxL is not None:
            src = (me - hops) % n
            bias_BxHxCxC = jax.lax.dynamic_slice_in_dim(bias_BxHxCxL, src * c, c, axis=3)
            s_BxKxGxCxC += bias_BxHxCxC.astype(jnp.float32).reshape(-1, kv, g, c, c)
        s_BxKxGxCxC = jnp.where(mask_BxCxC[:, None, None], s_BxKxGxCxC, NEG_INF)
        m_new = jnp.maximum(m_BxKxGxC, s_BxKxGxCxC.max(-1))
        correction = jnp.exp(m_BxKxGxC - m_new)
        p_BxKxGxCxC = jnp.exp(s_BxKxGxCxC - m_new[..., None])
        l_new = l_BxKxGxC * correction + p_BxKxGxCxC.sum(-1)
        pv = jnp.einsum(
            "bkgcs,bskd->bkgcd", p_BxKxGxCxC.astype(v_blk.dtype), v_blk,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return m_new, l_new, acc_BxKxGxCxDh * correction[..., None] + pv

    # Recompute each block's logits in the backward pass instead of saving n of them:
    # what the loop keeps per hop is one K/V block and the float32 accumulators.
    attend = jax.checkpoint(attend)

    def mask_of(kv_block: tuple) -> jax.Array:
        return block_mask(
            segment_ids_BxC, causal, key_segment_ids_BxS=kv_block[2],
            positions_BxL=positions_BxC, key_positions_BxS=kv_block[3], window=window,
        )  # fmt: skip

    own = (k_BxCxKxDh, v_BxCxKxDh, segment_ids_BxC, positions_BxC)
    carry = (
        jnp.full((b, kv, g, c), NEG_INF, jnp.float32),
        jnp.zeros((b, kv, g, c), jnp.float32),
        jnp.zeros((b, kv, g, c, dh), jnp.float32),
    )
    # The own block is always folded in, so every row's l is at least 1 below.
    carry = attend(carry, own, mask_of(own), jnp.zeros((), jnp.int32))
    ring = [(i, (i + 1) % n) for i in range(n)]

    def hop(state: tuple, hops: jax.Array) -> tuple[tuple, None]:
        carry, kv_block = state
        kv_block = tuple(jax.lax.ppermute(x, axis, ring) for x in kv_block)
        mask_BxCxC = mask_of(kv_block)
        # A block nothing in this query block may see (a later block under a causal
        # mask) changes nothing: skip its matmuls. The mask decides, so this is exact.
        carry = jax.lax.cond(
            mask_BxCxC.any(),
            lambda: attend(carry, kv_block, mask_BxCxC, hops),
            lambda: carry,
        )
        return (carry, kv_block), None

    (carry, _), _ = jax.lax.scan(hop, (carry, own), jnp.arange(1, n, dtype=jnp.int32))
    _, l_BxKxGxC, acc_BxKxGxCxDh = carry
    out_BxKxGxCxDh = acc_BxKxGxCxDh / l_BxKxGxC[..., None]
    out_BxCxKxGxDh = out_BxKxGxCxDh.transpose(0, 3, 1, 2, 4)
    return out_BxCxKxGxDh.reshape(b, c, h, dh).astype(v_BxCxKxDh.dtype)
