"""An encoder-decoder Transformer (Vaswani et al. 2017), parts chosen by config.

The encoder attends bidirectionally within each packed source; the decoder attends
causally within its target and across to the encoder output of the same pair (matching
segment ids). Embeddings are shared by encoder, decoder and the output projection.
Tensor names: B batch, S source length, L target length, D width, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention.masks import attention_mask, cache_slots, segments_and_positions
from jaxformer.model.config import ModelConfig
from jaxformer.model.layers import MLP, Attention, Norm, TokenEmbeddings, dropout, stack_hidden
from jaxformer.model.remat import REMAT_POLICIES
from jaxformer.parallel.sharding import constrain

Captured = dict[str, jax.Array]


def _sublayer(
    cfg: ModelConfig, norm: Norm, x_BxLxD: jax.Array, fn: Callable, key: jax.Array | None
) -> tuple[jax.Array, Any]:
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``, with residual dropout;
    ``fn`` returns (output, extra) and the extra is passed through."""
    if cfg.norm_position == "pre":
        h, extra = fn(norm(x_BxLxD))
        return x_BxLxD + dropout(h, cfg.dropout, key), extra
    h, extra = fn(x_BxLxD)
    return norm(x_BxLxD + dropout(h, cfg.dropout, key)), extra


def _no_extra(fn: Callable) -> Callable:
    return lambda h: (fn(h), None)


class EncoderBlock(nnx.Module):
    """Bidirectional self-attention (plus an optional logit bias, T5's) and MLP."""

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
        key: Any,
        bias_BxHxSxS: jax.Array | None = None,
        capture: bool = False,
    ) -> tuple[jax.Array, Captured]:
        """The block's output and, with ``capture``, its input and attention ({})."""
        keys = jax.random.split(key) if key is not None else (None, None)
        out_BxSxD, probs = _sublayer(
            self.cfg, self.attn_norm, x_BxSxD,
            lambda h: self.attn(h, mask_BxSxS, positions_BxS, bias_BxHxSxS, return_probs=capture),
            keys[0],
        )  # fmt: skip
        out_BxSxD, _ = _sublayer(self.cfg, self.mlp_norm, out_BxSxD, _no_extra(self.mlp), keys[1])
        captured = {"hidden": x_BxSxD, "attention": probs} if capture else {}
        return constrain(out_BxSxD, ("batch", "length", "act_embed")), captured


class DecoderBlock(nnx.Module):
    """Causal self-attention (plus an optional logit bias), cross-attention to the
    encoder output, and MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.cross_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.cross = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def _layers(
        self, x_BxLxD: jax.Array, attend: Callable, memory_kv: tuple, cross_mask_BxLxS: jax.Array,
        keys: Any, capture: bool,
    ) -> tuple[jax.Array, Any, Any]:  # fmt: skip
        """The three residual sublayers; ``attend`` is the self-attention (full or cached)."""
        cfg = self.cfg
        x_BxLxD, extra = _sublayer(cfg, self.attn_norm, x_BxLxD, attend, keys[0])
        x_BxLxD, cross_probs = _sublayer(
            cfg, self.cross_norm, x_BxLxD,
            lambda h: self.cross.cross(h, memory_kv, cross_mask_BxLxS, return_probs=capture),
            keys[1],
        )  # fmt: skip
        x_BxLxD, _ = _sublayer(cfg, self.mlp_norm, x_BxLxD, _no_extra(self.mlp), keys[2])
        return constrain(x_BxLxD, ("batch", "length", "act_embed")), extra, cross_probs

    def __call__(
        self,
        x_BxLxD: jax.Array,
        memory_kv: tuple[jax.Array, jax.Array],
        self_mask_BxLxL: jax.Array,
        cross_mask_BxLxS: jax.Array,
        positions_BxL: jax.Array,
        key: Any,
        bias_BxHxLxL: jax.Array | None = None,
        capture: bool = False,
    ) -> tuple[jax.Array, Captured]:
        """The block's output and, with ``capture``, its input and both attentions ({}).
        ``memory_kv`` is this block's :meth:`Attention.memory_kv` of the encoder output."""
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)

        def attend(h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
            return self.attn(h, self_mask_BxLxL, positions_BxL, bias_BxHxLxL, return_probs=capture)

        out_BxLxD, probs, cross_probs = self._layers(
            x_BxLxD, attend, memory_kv, cross_mask_BxLxS, keys, capture
        )
        captured = (
            {"hidden": x_BxLxD, "attention": probs, "cross_attention": cross_probs}
            if capture
            else {}
        )
        return out_BxLxD, captured

    def decode(
        self,
        x_BxTxD: jax.Array,
        memory_kv: tuple[jax.Array, jax.Array],
        self_mask_BxTxS: jax.Array,
        cross_mask_BxTxS: jax.Array,
        positions_BxT: jax.Array,
        key_positions_BxS: jax.Array,
        kv_cache: dict[str, jax.Array],
        index: jax.Array,
        bias_BxHxTxS: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """T new tokens against the self-attention cache and the cached memory K/V."""

        def attend(h: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
            return self.attn.decode(
                h, self_mask_BxTxS, positions_BxT, key_positions_BxS, kv_cache, index,
                bias_BxHxTxS,
            )  # fmt: skip

        x_BxTxD, kv_cache, _ = self._layers(
            x_BxTxD, attend, memory_kv, cross_mask_BxTxS, (None, None, None), False
        )
        return x_BxTxD, kv_cache


def _stack(cfg: ModelConfig, block: type, layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``layers`` blocks with their parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return block(cfg, rngs)

    return make(rngs)


def _scan(
    cfg: ModelConfig, blocks: nnx.Module, x: jax.Array, key: Any, call: Callable, *xs: Any
) -> tuple[jax.Array, Any]:
    """Applies stacked ``blocks`` in order with ``call(block, x, layer_key, *layer_xs)``,
    which returns (x, per-layer output); ``xs`` are sliced along their leading axis like
    the blocks. Returns the final x and the per-layer outputs stacked."""
    layers = jax.tree.leaves(nnx.state(blocks))[0].shape[0]
    train = key is not None
    keys = jax.random.split(key, layers) if train else jnp.zeros(layers)

    def apply(block: nnx.Module, x: jax.Array, k: jax.Array, *layer_xs: Any) -> Any:
        return call(block, x, k if train else None, *layer_xs)

    if cfg.remat != "none":
        apply = nnx.remat(apply, policy=REMAT_POLICIES[cfg.remat])
    scan = nnx.scan(
        lambda x, block, k, *layer_xs: apply(block, x, k, *layer_xs),
        in_axes=(nnx.Carry, 0, 0, *(0 for _ in xs)),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    return scan(x, blocks, keys, *xs)


class EncoderDecoder(TokenEmbeddings, nnx.Module):
    """Shared embedding, encoder stack, decoder stack with cross-attention, tied logits.

    Subclasses (T5) change the parts through the hooks ``_encoder_bias``,
    ``_decoder_bias``, ``_finish`` (a stack's end) and ``_logits``; the training
    forward, the cached decoding and the introspection outputs are shared.
    """

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

    # -- the parts a family may change ------------------------------------------------

    def _encoder_bias(self, positions_BxS: jax.Array) -> jax.Array | None:
        """An additive self-attention logit bias shared by the encoder's layers."""
        return None

    def _decoder_bias(
        self, positions_BxL: jax.Array, key_positions_BxS: jax.Array
    ) -> jax.Array | None:
        """An additive self-attention logit bias shared by the decoder's layers."""
        return None

    def _finish(self, norm: Norm | None, x_BxLxD: jax.Array, key: Any) -> jax.Array:
        """A stack's output: its final norm (pre-norm models) or x as it is (post-norm)."""
        return norm(x_BxLxD) if norm is not None else x_BxLxD

    def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.output_logits(x_BxLxD)

    # -- training forward ---------------------------------------------------------------

    def _encode(
        self,
        tokens_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        positions_BxS: jax.Array,
        key: Any = None,
        capture: bool = False,
    ) -> tuple[jax.Array, Captured]:
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_BxSxD = self._embed(tokens_BxS, positions_BxS, keys[0])
        mask_BxSxS = attention_mask(segment_ids_BxS, causal=False)
        bias_BxHxSxS = self._encoder_bias(positions_BxS)
        x_BxSxD, captured = _scan(
            self.cfg, self.encoder, x_BxSxD, keys[1],
            lambda block, x, k: block(x, mask_BxSxS, positions_BxS, k, bias_BxHxSxS, capture),
        )  # fmt: skip
        memory_BxSxD = self._finish(self.encoder_norm, x_BxSxD, keys[2])
        return memory_BxSxD, stack_hidden(captured, memory_BxSxD, "encoder_") if capture else {}

    def encode(
        self,
        tokens_BxS: jax.Array,
        segment_ids_BxS: jax.Array,
        positions_BxS: jax.Array,
        key: Any = None,
    ) -> jax.Array:
        """The encoder output ("memory") for packed sources."""
        return self._encode(tokens_BxS, segment_ids_BxS, positions_BxS, key)[0]

    def _decode_train(
        self,
        memory_BxSxD: jax.Array,
        encoder_segment_ids_BxS: jax.Array,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        key: Any = None,
        capture: bool = False,
    ) -> tuple[jax.Array, Captured]:
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        x_BxLxD = self._embed(inputs_BxL, positions_BxL, keys[0])
        self_mask_BxLxL = attention_mask(segment_ids_BxL, causal=True, positions_BxL=positions_BxL)
        cross_mask_BxLxS = attention_mask(
            segment_ids_BxL, causal=False, key_segment_ids_BxS=encoder_segment_ids_BxS
        )
        bias_BxHxLxL = self._decoder_bias(positions_BxL, positions_BxL)

        def call(block: DecoderBlock, x: jax.Array, k: Any) -> tuple[jax.Array, Captured]:
            return block(
                x, block.cross.memory_kv(memory_BxSxD), self_mask_BxLxL, cross_mask_BxLxS,
                positions_BxL, k, bias_BxHxLxL, capture,
            )  # fmt: skip

        x_BxLxD, captured = _scan(self.cfg, self.decoder, x_BxLxD, keys[1], call)
        x_BxLxD = self._finish(self.decoder_norm, x_BxLxD, keys[2])
        return self._logits(x_BxLxD), stack_hidden(captured, x_BxLxD, "decoder_") if capture else {}

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
        return self._decode_train(
            memory_BxSxD, encoder_segment_ids_BxS, inputs_BxL, segment_ids_BxL, positions_BxL,
            key,
        )[0]  # fmt: skip

    def __call__(
        self,
        encoder_inputs_BxS: jax.Array,
        encoder_segment_ids_BxS: jax.Array,
        encoder_positions_BxS: jax.Array,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        dropout_key: jax.Array | None = None,
        *,
        capture: bool = False,
    ) -> jax.Array | tuple[jax.Array, Captured]:
        """Float32 logits [B, L, V] (with ``capture``: and the intermediates, see
        :func:`jaxformer.model.capture_intermediates`)."""
        keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        memory_BxSxD, encoder_captured = self._encode(
            encoder_inputs_BxS, encoder_segment_ids_BxS, encoder_positions_BxS, keys[0], capture
        )
        logits_BxLxV, decoder_captured = self._decode_train(
            memory_BxSxD, encoder_segment_ids_BxS, inputs_BxL, segment_ids_BxL, positions_BxL,
            keys[1], capture,
        )  # fmt: skip
        return (logits_BxLxV, encoder_captured | decoder_captured) if capture else logits_BxLxV

    def apply_batch(
        self,
        batch: dict[str, jax.Array],
        dropout_key: jax.Array | None = None,
        *,
        capture: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits aligned with ``batch["targets"]``, and aux values: none (no MoE here),
        or the intermediates with ``capture``."""
        out = self(
            batch["encoder_inputs"], batch["encoder_segment_ids"], batch["encoder_positions"],
            batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key,
            capture=capture,
        )  # fmt: skip
        return out if capture else (out, {})

    # -- cached decoding ----------------------------------------------------------------

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: Any = None,
        *,
        encoder_inputs_BxS: jax.Array | None = None,
        encoder_mask_BxS: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """A decoding cache of ``max_len`` target slots per row. Given the sources (and
        their mask, True for real tokens), the encoder runs here, once, and every decoder
        layer's cross-attention keys and values of its output are cached; without them
        the memory slots are an empty placeholder of one source token."""
        cfg = self.cfg
        dtype = dtype or cfg.dtype
        layers, kv, dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        zeros = functools.partial(jnp.zeros, dtype=dtype)
        cache = {
            "k": zeros((layers, batch_size, max_len, kv, dh)),
            "v": zeros((layers, batch_size, max_len, kv, dh)),
            "memory_k": zeros((layers, batch_size, 1, kv, dh)),
            "memory_v": zeros((layers, batch_size, 1, kv, dh)),
            "encoder_segment_ids": jnp.zeros((batch_size, 1), jnp.int32),
            "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
            "positions": jnp.zeros((batch_size, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }
        if encoder_inputs_BxS is None:
            return cache
        if encoder_mask_BxS is None:
            encoder_mask_BxS = jnp.ones(encoder_inputs_BxS.shape, bool)
        segment_ids_BxS, positions_BxS = segments_and_positions(encoder_mask_BxS)
        memory_BxSxD = self.encode(encoder_inputs_BxS, segment_ids_BxS, positions_BxS)
        _, (memory_k, memory_v) = _scan(
            cfg, self.decoder, memory_BxSxD, None,
            lambda block, m, k: (m, block.cross.memory_kv(m)),
        )  # fmt: skip
        cache["memory_k"], cache["memory_v"] = memory_k.astype(dtype), memory_v.astype(dtype)
        cache["encoder_segment_ids"] = segment_ids_BxS
        return cache

    def decode(
        self,
        inputs_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        cache: dict[str, jax.Array],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits for T new target tokens given the cache (as ``DecoderLM.decode``): the
        same interface, so :mod:`jaxformer.decode` drives both families."""
        index = cache["index"]
        seg_BxS, pos_BxS, self_mask_BxTxS = cache_slots(cache, segment_ids_BxT, positions_BxT)
        cross_mask_BxTxS = attention_mask(
            segment_ids_BxT, causal=False, key_segment_ids_BxS=cache["encoder_segment_ids"]
        )
        bias_BxHxTxS = self._decoder_bias(positions_BxT, pos_BxS)
        x_BxTxD = self._embed(inputs_BxT, positions_BxT, None)

        def step(block: DecoderBlock, x: jax.Array, _: Any, *layer_cache: jax.Array) -> tuple:
            k, v, memory_k, memory_v = layer_cache
            x, kv = block.decode(
                x, (memory_k, memory_v), self_mask_BxTxS, cross_mask_BxTxS, positions_BxT,
                pos_BxS, {"k": k, "v": v}, index, bias_BxHxTxS,
            )  # fmt: skip
            return x, (kv["k"], kv["v"])

        x_BxTxD, (k_cache, v_cache) = _scan(
            self.cfg, self.decoder, x_BxTxD, None, step,
            cache["k"], cache["v"], cache["memory_k"], cache["memory_v"],
        )  # fmt: skip
        x_BxTxD = self._finish(self.decoder_norm, x_BxTxD, None)
        new_cache = {
            **cache,
            "k": k_cache,
            "v": v_cache,
            "segment_ids": seg_BxS,
            "positions": pos_BxS,
            "index": index + inputs_BxT.shape[1],
        }
        return self._logits(x_BxTxD), new_cache
