"""T5 (Raffel et al. 2020) and T5.1.1: an encoder-decoder with relative position bias.

A subclass of :class:`jaxformer.model.encoder_decoder.EncoderDecoder`, which differs in: no
absolute positions; each stack adds a learned, per-head bias of the bucketed distance
between query and key to its self-attention logits (one ``[buckets, H]`` table per stack,
in HF's first layer, shared by all layers); logits are not scaled by 1/sqrt(d_k) (T5 folds
that into the initialisation); pre-norm, scale-only RMSNorm, no biases. T5 1.0 ties the
output to the embedding and scales the decoder output by d_model^-0.5 first; T5.1.1 has an
untied head and gated-GELU MLPs (``model.mlp = "geglu"``). The bias is computed from
positions, so packed pairs get the same bias as unpacked ones; the segment mask keeps them
apart.
Tensor names: B batch, S source length, L target length, D width, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model.config import ModelConfig
from jaxformer.model.encoder_decoder import EncoderDecoder
from jaxformer.model.layers import Norm, dropout, param


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of ``key_position - query_position`` (as HF/Mesh TensorFlow).

    Half the buckets (per direction, if bidirectional) hold exact small distances, the rest
    log-spaced distances up to ``max_distance``, beyond which they saturate. Unidirectional
    (the causal decoder) maps every future key to bucket 0.
    """
    relative_position = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # The same float32 operations in the same order as HF, so boundaries round alike.
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_large / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(n < max_exact, n, large)


class RelativeBias(nnx.Module):
    """A ``[buckets, H]`` table turned into an additive attention bias ``[B, H, L, S]``."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool, rngs: nnx.Rngs):
        self.cfg, self.bidirectional = cfg, bidirectional
        init = nnx.initializers.normal(cfg.init_std)
        self.table = param(
            rngs, init, (cfg.relative_buckets, cfg.num_heads), (None, "heads"), jnp.float32
        )

    def __call__(self, positions_BxL: jax.Array, key_positions_BxS: jax.Array) -> jax.Array:
        cfg = self.cfg
        relative_BxLxS = key_positions_BxS[:, None, :] - positions_BxL[:, :, None]
        bucket_BxLxS = relative_position_bucket(
            relative_BxLxS, self.bidirectional, cfg.relative_buckets, cfg.relative_max_distance
        )
        bias_BxLxSxH = jnp.take(self.table[...], bucket_BxLxS, axis=0)
        return jnp.transpose(bias_BxLxSxH, (0, 3, 1, 2))


class T5(EncoderDecoder):
    """:class:`EncoderDecoder` with T5's parts: relative position bias per stack, final
    norms followed by dropout, and the d_model^-0.5 rescale before a tied projection."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.position != "none":
            raise ValueError(f"T5 has no absolute positions: set model.position='none', got "
                             f"{cfg.position!r}")  # fmt: skip
        if cfg.norm_position != "pre":
            raise ValueError(f"T5 is pre-norm: set model.norm_position='pre', got "
                             f"{cfg.norm_position!r}")  # fmt: skip
        super().__init__(cfg, rngs)
        self.encoder_relative_bias = RelativeBias(cfg, bidirectional=True, rngs=rngs)
        self.decoder_relative_bias = RelativeBias(cfg, bidirectional=False, rngs=rngs)

    def _encoder_bias(self, positions_BxS: jax.Array) -> jax.Array:
        return self.encoder_relative_bias(positions_BxS, positions_BxS)

    def _decoder_bias(self, positions_BxL: jax.Array, key_positions_BxS: jax.Array) -> jax.Array:
        return self.decoder_relative_bias(positions_BxL, key_positions_BxS)

    def _finish(self, norm: Norm | None, x_BxLxD: jax.Array, key: Any) -> jax.Array:
        return dropout(norm(x_BxLxD), self.cfg.dropout, key)

    def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:  # T5 1.0: rescale before the tied projection (Mesh TF)
            x_BxLxD = x_BxLxD * self.cfg.d_model**-0.5
        return self.output_logits(x_BxLxD)
