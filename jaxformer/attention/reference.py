"""The einsum reference attention: plain XLA ops, float32 logits and softmax.

Every other backend is tested against it, and it is what runs where no fused kernel
does (CPUs, float32, encoders, cross-attention, logit biases, introspection).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxformer.attention.masks import SegmentMask, causal_blocks


def einsum_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask_BxLxS: jax.Array | SegmentMask,
    bias_BxHxLxS: jax.Array | None,
    *,
    scale: float,
    return_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax(q k^T * scale + bias, masked) v with grouped KV heads.

    Causal self-attention (a causal :class:`SegmentMask`) runs in query blocks that skip
    the keys masked for a whole block (:func:`causal_blocks`): the same numbers with less
    work. ``return_probs`` also returns the float32 probabilities ``[B, H, L, S]``.
    """
    blocks = None
    if isinstance(mask_BxLxS, SegmentMask):
        if mask_BxLxS.causal and q_BxLxHxDh.shape[1] == k_BxSxKxDh.shape[1]:
            blocks = causal_blocks(q_BxLxHxDh.shape[1], mask_BxLxS.window)
        mask_BxLxS = mask_BxLxS.dense()
    h, kv = q_BxLxHxDh.shape[2], k_BxSxKxDh.shape[2]
    # Each KV head repeated for its group of query heads: 4-D products, which XLA:CPU runs
    # 1.5-1.8x faster forward + backward than grouping the queries as [B, L, K, G, Dh].
    k_BxSxHxDh = jnp.repeat(k_BxSxKxDh, h // kv, axis=2) if kv < h else k_BxSxKxDh
    v_BxSxHxDh = jnp.repeat(v_BxSxKxDh, h // kv, axis=2) if kv < h else v_BxSxKxDh
    if blocks is None or return_probs or len(blocks) == 1:
        return softmax_attention(
            q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxLxS, bias_BxHxLxS, scale, return_probs
        )
    return causal_blocks_attention(
        q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxLxS, bias_BxHxLxS, scale, tuple(blocks)
    )


@functools.partial(
    jax.checkpoint,
    policy=jax.checkpoint_policies.save_only_these_names("attention_probs"),
    static_argnums=(5, 6),
)
def causal_blocks_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxHxDh: jax.Array,
    v_BxSxHxDh: jax.Array,
    mask_BxLxS: jax.Array,
    bias_BxHxLxS: jax.Array | None,
    scale: float,
    blocks: tuple[tuple[int, int, int], ...],
) -> jax.Array:
    """Causal self-attention over the query ``blocks`` of :func:`causal_blocks`.

    A checkpoint that keeps the blocks' probabilities and its whole inputs for the
    backward pass: left to autodiff, every block kept its own slice of k and v (2.5x
    their size at 4 blocks), which the layer scan then copied into its stacks.
    """
    outs = []
    for start, end, key_start in blocks:
        bias = None if bias_BxHxLxS is None else bias_BxHxLxS[..., start:end, key_start:end]
        outs.append(
            softmax_attention(
                q_BxLxHxDh[:, start:end],
                k_BxSxHxDh[:, key_start:end],
                v_BxSxHxDh[:, key_start:end],
                mask_BxLxS[:, start:end, key_start:end],
                bias,
                scale,
                return_probs=False,
            )  # fmt: skip
        )
    return jnp.concatenate(outs, axis=1)


def softmax_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxHxDh: jax.Array,
    v_BxSxHxDh: jax.Array,
    mask_BxLxS: jax.Array,
    bias_BxHxLxS: jax.Array | None,
    scale: float,
    return_probs: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The einsum reference: float32 scores and softmax, every head its own K and V."""
    att_BxHxLxS = (
        jnp.einsum("blhd,bshd->bhls", q_BxLxHxDh, k_BxSxHxDh, preferred_element_type=jnp.float32)
        * scale
    )
    if bias_BxHxLxS is not None:
        att_BxHxLxS += bias_BxHxLxS
    att_BxHxLxS = jnp.where(mask_BxLxS[:, None], att_BxHxLxS, -1e30)
    probs_BxHxLxS = checkpoint_name(jax.nn.softmax(att_BxHxLxS, axis=-1), "attention_probs")
    out_BxLxHxDh = jnp.einsum("bhls,bshd->blhd", probs_BxHxLxS.astype(v_BxSxHxDh.dtype), v_BxSxHxDh)
    if return_probs:
        return out_BxLxHxDh, probs_BxHxLxS
    return out_BxLxHxDh


@dataclasses.dataclass(frozen=True)
class Einsum:
    """The reference backend (``model.attention_impl=einsum``); also the model's default
    when no backend was selected for it. The attention-backend signature is its
    ``__call__``'s; ``self_mask`` builds the dense mask once for all of a stack's layers."""

    name: str = "einsum"

    def __call__(
        self,
        q_BxLxHxDh: jax.Array,
        k_BxSxKxDh: jax.Array,
        v_BxSxKxDh: jax.Array,
        mask_BxLxS: jax.Array | SegmentMask,
        bias_BxHxLxS: jax.Array | None,
        *,
        scale: float,
        return_probs: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        return einsum_attention(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
            scale=scale, return_probs=return_probs,
        )  # fmt: skip

    def self_mask(
        self, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, causal: bool, window: int = 0
    ) -> SegmentMask:
        """The self-attention mask a stack's layers share, its dense form built once."""
        mask = SegmentMask(segment_ids_BxL, positions_BxL, causal=causal, window=window)
        return mask.replace(dense_BxLxL=mask.dense())


EINSUM = Einsum()
