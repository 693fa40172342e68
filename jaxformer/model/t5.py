"""T5 (Raffel et al. 2020) and T5.1.1: an encoder-decoder with relative position bias.

Differences from :class:`jaxformer.model.encoder_decoder.EncoderDecoder`: no absolute
positions; each stack adds a learned, per-head bias of the bucketed distance between query
and key to its self-attention logits (one ``[buckets, H]`` table per stack, in HF's first
layer, shared by all layers); logits are not scaled by 1/sqrt(d_k) (T5 folds that into the
initialisation); pre-norm, scale-only RMSNorm, no biases. T5 1.0 ties the output to the
embedding and scales the decoder output by d_model^-0.5 first; T5.1.1 has an untied head and
gated-GELU MLPs (``model.mlp = "geglu"``). The bias is computed from positions, so packed
pairs get the same bias as unpacked ones; the segment mask keeps them apart.
Tensor names: B batch, S source length, L target length, D width, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model.decoder import ModelConfig
from jaxformer.model.encoder_decoder import Seq2Seq, _scan, _stack, _sublayer
from jaxformer.model.layers import (
    MLP,
    Attention,
    Norm,
    TokenEmbeddings,
    attention_mask,
    dropout,
    param,
)
from jaxformer.parallel import constrain


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


class T5EncoderBlock(nnx.Module):
    """Bidirectional self-attention with the stack's position bias, then the MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(
        self,
        x_BxSxD: jax.Array,
        mask_BxSxS: jax.Array,
        positions_BxS: jax.Array,
        bias_BxHxSxS: jax.Array,
        key: Any,
    ) -> jax.Array:
        keys = jax.random.split(key) if key is not None else (None, None)
        x_BxSxD = _sublayer(
            self.cfg, self.attn_norm, x_BxSxD,
            lambda h: self.attn(h, mask_BxSxS, positions_BxS, bias_BxHxSxS), keys[0],
        )  # fmt: skip
        x_BxSxD = _sublayer(self.cfg, self.mlp_norm, x_BxSxD, self.mlp, keys[1])
        return constrain(x_BxSxD, ("batch", "length", "act_embed"))


class T5DecoderBlock(nnx.Module):
    """Causal self-attention with position bias, cross-attention (no bias), then the MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.cross_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.cross = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(
        self,
        x_BxLxD: jax.Array,
        memory_BxSxD: jax.Array,
        self_mask_BxLxL: jax.Array,
        cross_mask_BxLxS: jax.Array,
        positions_BxL: jax.Array,
        bias_BxHxLxL: jax.Array,
        key: Any,
    ) -> jax.Array:
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_BxLxD = _sublayer(
            self.cfg, self.attn_norm, x_BxLxD,
            lambda h: self.attn(h, self_mask_BxLxL, positions_BxL, bias_BxHxLxL), keys[0],
        )  # fmt: skip
        x_BxLxD = _sublayer(
            self.cfg, self.cross_norm, x_BxLxD,
            lambda h: self.cross.cross(h, memory_BxSxD, cross_mask_BxLxS), keys[1],
        )  # fmt: skip
        x_BxLxD = _sublayer(self.cfg, self.mlp_norm, x_BxLxD, self.mlp, keys[2])
        return constrain(x_BxLxD, ("batch", "length", "act_embed"))


class T5(Seq2Seq, TokenEmbeddings, nnx.Module):
    """Shared embedding, encoder and decoder stacks with relative position bias, logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.position != "none":
            raise ValueError(f"T5 has no absolute positions: set model.position='none', got "
                             f"{cfg.position!r}")  # fmt: skip
        self.cfg = cfg
        self._init_embeddings(cfg, rngs)
        self.encoder_relative_bias = RelativeBias(cfg, bidirectional=True, rngs=rngs)
        self.encoder = _stack(cfg, T5EncoderBlock, cfg.num_encoder_layers, rngs)
        self.encoder_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.decoder_relative_bias = RelativeBias(cfg, bidirectional=False, rngs=rngs)
        self.decoder = _stack(cfg, T5DecoderBlock, cfg.num_layers, rngs)
        self.decoder_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)

    def encode(
        self,
        tokens_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        positions_BxS: jax.Array,
        key: Any = None,
    ) -> jax.Array:
        """The encoder output ("memory") for packed sources."""
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_BxSxD = self._embed(tokens_BxS, positions_BxS, keys[0])
        mask_BxSxS = attention_mask(segment_ids_BxS, causal=False)
        bias_BxHxSxS = self.encoder_relative_bias(positions_BxS, positions_BxS)
        x_BxSxD = _scan(
            self.cfg, self.encoder, x_BxSxD, keys[1],
            lambda block, x, k: block(x, mask_BxSxS, positions_BxS, bias_BxHxSxS, k),
        )  # fmt: skip
        return dropout(self.encoder_norm(x_BxSxD), self.cfg.dropout, keys[2])

    def decode_train(
        self,
        memory_BxSxD: jax.Array,
        encoder_segment_ids_BxS: jax.Array,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        key: Any = None,
    ) -> jax.Array:
        """Float32 logits for every target position, teacher-forced on ``inputs``."""
        cfg = self.cfg
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_BxLxD = self._embed(inputs_BxL, positions_BxL, keys[0])
        self_mask_BxLxL = attention_mask(segment_ids_BxL, causal=True, positions_BxL=positions_BxL)
        cross_mask_BxLxS = attention_mask(
            segment_ids_BxL, causal=False, key_segment_ids_BxS=encoder_segment_ids_BxS
        )
        bias_BxHxLxL = self.decoder_relative_bias(positions_BxL, positions_BxL)
        x_BxLxD = _scan(
            cfg, self.decoder, x_BxLxD, keys[1],
            lambda block, x, k: block(
                x, memory_BxSxD, self_mask_BxLxL, cross_mask_BxLxS, positions_BxL,
                bias_BxHxLxL, k,
            ),
        )  # fmt: skip
        x_BxLxD = dropout(self.decoder_norm(x_BxLxD), cfg.dropout, keys[2])
        if cfg.tie_embeddings:  # T5 1.0: rescale before the tied projection (Mesh TF)
            x_BxLxD = x_BxLxD * cfg.d_model**-0.5
        return self._output_logits(x_BxLxD)
