"""Attention masks as the model and every attention backend build them.

Pure ``jax.numpy``: no modules, no mesh. A mask says which keys each query may see:
the same non-padding document (segment ids), causality, a sliding window.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def attention_mask(
    segment_ids_BxL: jax.Array,
    causal: bool,
    *,
    key_segment_ids_BxS: jax.Array | None = None,
    positions_BxL: jax.Array | None = None,
    key_positions_BxS: jax.Array | None = None,
    window: int = 0,
) -> jax.Array:
    """True where query i may attend to key j: same non-padding document, and (causal)
    j not after i, and (``window > 0``) j fewer than ``window`` positions before i.

    Keys default to the queries (self-attention). With positions given, "after" and the
    window compare positions, which also holds for keys in a decoding cache.
    """
    seg_k = segment_ids_BxL if key_segment_ids_BxS is None else key_segment_ids_BxS
    mask_BxLxS = (segment_ids_BxL[:, :, None] == seg_k[:, None, :]) & (
        segment_ids_BxL[:, :, None] > 0
    )
    if not causal and window <= 0:
        return mask_BxLxS
    if positions_BxL is None:
        length = segment_ids_BxL.shape[1]
        positions_BxL = jnp.broadcast_to(jnp.arange(length), segment_ids_BxL.shape)
    pos_k = positions_BxL if key_positions_BxS is None else key_positions_BxS
    distance_BxLxS = positions_BxL[:, :, None] - pos_k[:, None, :]
    if causal:
        mask_BxLxS &= distance_BxLxS >= 0
    if window > 0:
        mask_BxLxS &= jnp.abs(distance_BxLxS) < window
    return mask_BxLxS


@flax.struct.dataclass
class SegmentMask:
    """A self-attention mask as :func:`attention_mask`'s arguments, with the dense
    ``[B, L, L]`` mask built once for all layers (``dense_BxLxL``) unless sequence
    parallelism or the splash kernel build theirs from the segment ids themselves.

    Causal masks here are causal in token order as well as in positions, so the einsum
    path may skip the key blocks after each query block (:func:`causal_blocks`).
    """

    segment_ids_BxL: jax.Array
    positions_BxL: jax.Array
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    window: int = flax.struct.field(pytree_node=False, default=0)
    dense_BxLxL: jax.Array | None = None

    def one_document_per_row(self) -> jax.Array:
        """A scalar, True when every row is one document with no padding and consecutive
        positions: then the mask is plain causal (window 0) and fused kernels need none."""
        seg_BxL, pos_BxL = self.segment_ids_BxL, self.positions_BxL
        same = jnp.all((seg_BxL == seg_BxL[:, :1]) & (seg_BxL > 0))
        return same & jnp.all(pos_BxL[:, 1:] - pos_BxL[:, :-1] == 1)

    def dense(self) -> jax.Array:
        if self.dense_BxLxL is not None:
            return self.dense_BxLxL
        mask_BxLxL = attention_mask(
            self.segment_ids_BxL, self.causal, positions_BxL=self.positions_BxL,
            window=self.window,
        )  # fmt: skip
        if self.causal:  # never a later token, whatever the positions say
            length = self.segment_ids_BxL.shape[1]
            mask_BxLxL &= jnp.tril(jnp.ones((length, length), bool))
        return mask_BxLxL


def causal_blocks(length: int, window: int = 0) -> list[tuple[int, int, int]]:
    """``(query_start, query_end, key_start)`` of the query blocks a causal self-attention
    of ``length`` is computed in, each against keys ``[key_start, query_end)``: the keys
    after a block (and, with a sliding ``window``, those too far before it) are masked
    for every query in it, so their scores are never computed. About 8 blocks of at
    least 128 queries: at length 512, 4 blocks compute 62% of the square."""
    block = max(128, length // 8)
    if length % block or length <= block:
        return [(0, length, 0)]
    return [
        (start, start + block, max(0, start - window + 1) if window > 0 else 0)
        for start in range(0, length, block)
    ]


def segments_and_positions(mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For one unpacked sequence per row with a padding mask (True for real tokens):
    segment id 1 for real tokens, 0 for padding, and positions counting real tokens
    from 0 (so left- or right-padded rows get the positions they would have alone)."""
    mask_BxL = mask_BxL.astype(jnp.int32)
    positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0) * mask_BxL
    return mask_BxL, positions_BxL.astype(jnp.int32)


def cache_slots(
    cache: dict[str, jax.Array],
    segment_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    window: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes T new tokens' segment ids and positions into a decoding cache's slots
    ``[index, index + T)``; returns every slot's (segment ids, positions) and the causal
    mask of the new tokens over the slots (padding and other documents never visible)."""
    index = cache["index"]
    seg_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxT, (0, index))
    pos_BxS = jax.lax.dynamic_update_slice(cache["positions"], positions_BxT, (0, index))
    mask_BxTxS = attention_mask(
        segment_ids_BxT, causal=True, key_segment_ids_BxS=seg_BxS,
        positions_BxL=positions_BxT, key_positions_BxS=pos_BxS, window=window,
    )  # fmt: skip
    return seg_BxS, pos_BxS, mask_BxTxS
