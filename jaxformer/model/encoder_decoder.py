"""An encoder-decoder Transformer (Vaswani et al. 2017), parts chosen by config.

The encoder attends bidirectionally within each packed source; the decoder attends
causally within its target and across to the encoder output of the same pair (matching
segment ids). Embeddings are shared by encoder, decoder and the output projection.
Tensor names: B batch, S source length, L target length, D width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model.decoder import REMAT_POLICIES, ModelConfig
from jaxformer.model.layers import MLP, Attention, Norm, TokenEmbeddings, attention_mask, dropout
from jaxformer.parallel import constrain


def _sublayer(
    cfg: ModelConfig, norm: Norm, x_BxLxD: jax.Array, fn: Callable, key: jax.Array | None
) -> jax.Array:
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``, with residual dropout."""
    if cfg.norm_position == "pre":
        return x_BxLxD + dropout(fn(norm(x_BxLxD)), cfg.dropout, key)
    return norm(x_BxLxD + dropout(fn(x_BxLxD), cfg.dropout, key))


class EncoderBlock(nnx.Module):
    """Bidirectional self-attention and MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(
        self, x_BxSxD: jax.Array, mask_BxSxS: jax.Array, positions_BxS: jax.Array, key: Any
    ) -> jax.Array:
        keys = jax.random.split(key) if key is not None else (None, None)
        x_BxSxD = _sublayer(
            self.cfg, self.attn_norm, x_BxSxD,
            lambda h: self.attn(h, mask_BxSxS, positions_BxS), keys[0],
        )  # fmt: skip
        x_BxSxD = _sublayer(self.cfg, self.mlp_norm, x_BxSxD, self.mlp, keys[1])
        return constrain(x_BxSxD, ("batch", "length", "act_embed"))


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention to the encoder output, and MLP."""

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
        key: Any,
    ) -> jax.Array:
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_BxLxD = _sublayer(
            self.cfg, self.attn_norm, x_BxLxD,
            lambda h: self.attn(h, self_mask_BxLxL, positions_BxL), keys[0],
        )  # fmt: skip
        x_BxLxD = _sublayer(
            self.cfg, self.cross_norm, x_BxLxD,
            lambda h: self.cross.cross(h, memory_BxSxD, cross_mask_BxLxS), keys[1],
        )  # fmt: skip
        x_BxLxD = _sublayer(self.cfg, self.mlp_norm, x_BxLxD, self.mlp, keys[2])
        return constrain(x_BxLxD, ("batch", "length", "act_embed"))


def _stack(cfg: ModelConfig, block: type, layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``layers`` blocks with their parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return block(cfg, rngs)

    return make(rngs)


def _scan(cfg: ModelConfig, blocks: nnx.Module, x: jax.Array, key: Any, call: Callable) -> Any:
    """Applies stacked ``blocks`` in order with ``call(block, x, layer_key)``."""
    layers = jax.tree.leaves(nnx.state(blocks))[0].shape[0]
    train = key is not None
    keys = jax.random.split(key, layers) if train else jnp.zeros(layers)

    def apply(block: nnx.Module, x: jax.Array, k: jax.Array) -> jax.Array:
        return call(block, x, k if train else None)

    if cfg.remat != "none":
        apply = nnx.remat(apply, policy=REMAT_POLICIES[cfg.remat])
    scan = nnx.scan(
        lambda x, block, k: apply(block, x, k),
        in_axes=(nnx.Carry, 0, 0),
        out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    return scan(x, blocks, keys)


class Seq2Seq:
    """The entry points every encoder-decoder family shares, given its ``encode`` and
    ``decode_train``."""

    def __call__(
        self,
        encoder_inputs_BxS: jax.Array,
        encoder_segment_ids_BxS: jax.Array,
        encoder_positions_BxS: jax.Array,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        memory_BxSxD = self.encode(
            encoder_inputs_BxS, encoder_segment_ids_BxS, encoder_positions_BxS, keys[0]
        )
        return self.decode_train(
            memory_BxSxD, encoder_segment_ids_BxS, inputs_BxL, segment_ids_BxL, positions_BxL,
            keys[1],
        )  # fmt: skip

    def apply_batch(
        self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits aligned with ``batch["targets"]``, and no aux values (no MoE here)."""
        logits = self(
            batch["encoder_inputs"], batch["encoder_segment_ids"], batch["encoder_positions"],
            batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key,
        )  # fmt: skip
        return logits, {}


class EncoderDecoder(Seq2Seq, TokenEmbeddings, nnx.Module):
    """Shared embedding, encoder stack, decoder stack with cross-attention, tied logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self._init_embeddings(cfg, rngs)
        self.encoder = _stack(cfg, EncoderBlock, cfg.num_encoder_layers, rngs)
        self.decoder = _stack(cfg, DecoderBlock, cfg.num_layers, rngs)
        pre = cfg.norm_position == "pre"
        self.encoder_norm = (
            Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs) if pre else None
        )
        self.decoder_norm = (
            Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs) if pre else None
        )

    def encode(
        self,
        tokens_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        positions_BxS: jax.Array,
        key: Any = None,
    ) -> jax.Array:
        """The encoder output ("memory") for packed sources."""
        keys = jax.random.split(key) if key is not None else (None, None)
        x_BxSxD = self._embed(tokens_BxS, positions_BxS, keys[0])
        mask_BxSxS = attention_mask(segment_ids_BxS, causal=False)
        x_BxSxD = _scan(
            self.cfg, self.encoder, x_BxSxD, keys[1],
            lambda block, x, k: block(x, mask_BxSxS, positions_BxS, k),
        )  # fmt: skip
        return self.encoder_norm(x_BxSxD) if self.encoder_norm is not None else x_BxSxD

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
        keys = jax.random.split(key) if key is not None else (None, None)
        x_BxLxD = self._embed(inputs_BxL, positions_BxL, keys[0])
        self_mask_BxLxL = attention_mask(segment_ids_BxL, causal=True, positions_BxL=positions_BxL)
        cross_mask_BxLxS = attention_mask(
            segment_ids_BxL, causal=False, key_segment_ids_BxS=encoder_segment_ids_BxS
        )
        x_BxLxD = _scan(
            cfg, self.decoder, x_BxLxD, keys[1],
            lambda block, x, k: block(
                x, memory_BxSxD, self_mask_BxLxL, cross_mask_BxLxS, positions_BxL, k
            ),
        )  # fmt: skip
        if self.decoder_norm is not None:
            x_BxLxD = self.decoder_norm(x_BxLxD)
        return self._output_logits(x_BxLxD)
