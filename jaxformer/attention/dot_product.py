"""``jax.nn.dot_product_attention``: cuDNN's fused kernel where it runs, XLA's elsewhere."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from jaxformer.attention.masks import SegmentMask
from jaxformer.attention.reference import Einsum, einsum_attention

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def sdpa_backend(platform: str, dtype: Any, head_dim: int) -> str:
    """The ``implementation`` of ``jax.nn.dot_product_attention`` to ask for.

    jax picks XLA's unfused attention when none is named (``implementation=None``), even
    on GPUs, so the fused cuDNN kernel has to be requested: on a GPU, for bf16/fp16 inputs
    and head dims cuDNN's flash kernel takes (a multiple of 8, at most 128).
    """
    fits = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if platform == "gpu" and fits else "xla"


def _skip_mask_when_unpacked(q_BxLxHxDh: jax.Array) -> bool:
    """Whether causal self-attention checks, per step, for rows without packing and then
    runs cuDNN with no mask. jax hands cuDNN a mask as a dense [B, 1, L, L] bias, made in
    every layer and read for every head: on an H100, llama_1b's attention ran at about
    200 TFLOP/s with it (docs/performance.md)."""
    dtype, head_dim = q_BxLxHxDh.dtype, q_BxLxHxDh.shape[-1]
    return sdpa_backend(jax.default_backend(), dtype, head_dim) == "cudnn"


def _causal_attention_unmasked_when_unpacked(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask: SegmentMask,
    scale: float,
) -> jax.Array:
    """Causal self-attention that passes the segment mask only when some row holds more
    than one document or padding (a runtime branch, both sides compiled); the rest is
    ``is_causal`` alone, the same function."""
    return jax.lax.cond(
        mask.one_document_per_row(),
        lambda q, k, v, _: _jax_nn_attention(q, k, v, None, None, scale, causal=True),
        lambda q, k, v, m: _jax_nn_attention(q, k, v, m, None, scale, causal=True),
        q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask.dense(),
    )  # fmt: skip


def _jax_nn_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask_BxLxS: jax.Array | None,
    bias_BxHxLxS: jax.Array | None,
    scale: float,
    *,
    causal: bool,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` on the backend :func:`sdpa_backend` picks. The
    mask (segments, window, causality) goes in whole; ``causal`` also lets cuDNN skip the
    blocks above the diagonal. If cuDNN refuses the call, XLA's implementation runs it."""
    args = (q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh)
    kwargs = dict(
        bias=None if bias_BxHxLxS is None else bias_BxHxLxS.astype(q_BxLxHxDh.dtype),
        mask=None if mask_BxLxS is None else mask_BxLxS[:, None],
        scale=scale,
    )
    backend = sdpa_backend(jax.default_backend(), q_BxLxHxDh.dtype, q_BxLxHxDh.shape[-1])
    if backend == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                *args, **kwargs, is_causal=causal, implementation="cudnn"
            )
        except (ValueError, NotImplementedError, RuntimeError) as e:  # version, layout
            logging.getLogger("jaxformer").warning("cuDNN attention refused (%s); using XLA", e)
    return jax.nn.dot_product_attention(*args, **kwargs, is_causal=causal, implementation="xla")


@dataclasses.dataclass(frozen=True)
class DotProduct(Einsum):
    """``model.attention_impl=dot_product``: every attention through jax.nn (cuDNN on GPUs
    for bf16/fp16), except introspection, which needs the probabilities."""

    name: str = "dot_product"

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
        if return_probs:
            return einsum_attention(
                q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
                scale=scale, return_probs=True,
            )  # fmt: skip
        causal = False
        if isinstance(mask_BxLxS, SegmentMask):
            if mask_BxLxS.causal and q_BxLxHxDh.shape[1] == k_BxSxKxDh.shape[1]:
                causal = True
                plain_causal = mask_BxLxS.window == 0 and bias_BxHxLxS is None
                if plain_causal and _skip_mask_when_unpacked(q_BxLxHxDh):
                    return _causal_attention_unmasked_when_unpacked(
                        q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, scale
                    )
            mask_BxLxS = mask_BxLxS.dense()
        return _jax_nn_attention(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS, scale, causal=causal
        )


@dataclasses.dataclass(frozen=True)
class FusedCausal(Einsum):
    """``model.attention_impl=auto`` where cuDNN runs: :class:`DotProduct` for causal
    self-attention without a logit bias (decoder LMs, the case measured on GPUs), the
    einsum reference for the rest (encoders, cross-attention, ALiBi and T5 biases)."""

    name: str = "auto"

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
        causal_self = isinstance(mask_BxLxS, SegmentMask) and mask_BxLxS.causal
        backend = DotProduct() if causal_self and bias_BxHxLxS is None else Einsum()
        return backend(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
            scale=scale, return_probs=return_probs,
        )  # fmt: skip
