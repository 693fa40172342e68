"""Transformer building blocks as Flax NNX modules: only math and logical axis names.

Attention itself runs through the backend object in ``ModelConfig.attention``
(``jaxformer/attention/``), chosen before the model is built. Tensor names carry their
shape: B batch, L length (queries), S length (keys), D model width, H query heads, K
key/value heads, G query heads per KV head, Dh head width, F MLP width, V vocabulary.
Parameters are float32 and cast to the compute dtype at use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxformer.model.products import contract_last, tied_logits
from jaxformer.parallel.sharding import constrain

Axes = tuple[str | None, ...]


def param(
    rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], axes: Axes, dtype: jnp.dtype
) -> nnx.Param:
    """A parameter tagged with the logical names of its axes (read by jaxformer.parallel).

    Eager sharding is off: placement is decided once, by jaxformer.parallel, when the
    whole state is created under ``jit``.
    """
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; ``key=None`` means evaluation (identity)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dense(nnx.Module):
    """y = x @ W (+ b) over the last ``len(in_shape)`` axes of x."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Axes,
        *,
        use_bias: bool,
        init_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.in_ndim = len(in_shape)
        init = nnx.initializers.normal(init_std)
        self.kernel = param(rngs, init, (*in_shape, *out_shape), axes, param_dtype)
        out_axes = axes[len(in_shape) :]
        self.bias = (
            param(rngs, nnx.initializers.zeros, out_shape, out_axes, param_dtype)
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        # Named so that the "dots" remat policies still save it: they look for dot_general
        # primitives, which contract_last's custom_vjp hides from them.
        y = checkpoint_name(contract_last(x.astype(self.dtype), kernel, self.in_ndim), "dense")
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (scale only) or LayerNorm (scale and bias), computed in float32."""

    def __init__(self, dim: int, kind: str, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("act_embed",), jnp.float32)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (dim,), ("act_embed",), jnp.float32)
            if kind == "layernorm"
            else None
        )

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return _normalize(x_BxLxD, self.scale[...], bias, self.kind, self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5))
def _normalize(
    x_BxLxD: jax.Array,
    scale_D: jax.Array,
    bias_D: jax.Array | None,
    kind: str,
    eps: float,
    dtype: jnp.dtype,
) -> jax.Array:
    """Norm's math, recomputed in the backward pass from x: autodiff kept the normalised
    ``[B, L, D]`` and two ``[B, L, 1]`` statistics besides x, per norm and layer."""
    x = x_BxLxD.astype(jnp.float32)
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)
    x = x * scale_D
    if bias_D is not None:
        x = x + bias_D
    return x.astype(dtype)


def sinusoidal(positions_BxL: jax.Array, dim: int) -> jax.Array:
    """Vaswani et al.: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angle_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    pe = jnp.stack([jnp.sin(angle_BxLxD2), jnp.cos(angle_BxLxD2)], axis=-1)
    return pe.reshape(*positions_BxL.shape, dim)


def rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, base: float) -> jax.Array:
    """Rotary embedding (Su et al.), rotating the two halves of each head (GPT-NeoX/LLaMA)."""
    half = x_BxLxHxDh.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_BxLx1xHalf = (positions_BxL[..., None].astype(jnp.float32) * inv_freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xHalf), jnp.cos(angle_BxLx1xHalf)
    x = x_BxLxHxDh.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxDh.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
    """Press et al.: 2^(-8k/n) for k = 1..n; for n not a power of two, the slopes of the
    next lower power of two followed by every other slope of the next higher one."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    low = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(low) + powers(2 * low)[0::2][: num_heads - low]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, positions_BxL: jax.Array, key_positions_BxS: jax.Array) -> jax.Array:
    """The ALiBi logit bias -m_h * |i - j|, shaped [B, H, L, S]."""
    distance_BxLxS = jnp.abs(positions_BxL[:, :, None] - key_positions_BxS[:, None, :])
    slopes_H = alibi_slopes(num_heads)
    return -slopes_H[None, :, None, None] * distance_BxLxS[:, None].astype(jnp.float32)


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads (MHA when K == H, MQA when K == 1)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(
            use_bias=cfg.use_bias,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.q = Dense((d,), (h, dh), ("embed", "heads", "head_dim"), **common)
        self.k = Dense((d,), (k, dh), ("embed", "kv_heads", "head_dim"), **common)
        self.v = Dense((d,), (k, dh), ("embed", "kv_heads", "head_dim"), **common)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.o = Dense(
            (h, dh), (d,), ("heads", "head_dim", "embed"), **{**common, "init_std": out_std}
        )
        self.cfg = cfg

    def _qkv(
        self, x_BxLxD: jax.Array, positions_BxL: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_BxLxHxDh = constrain(self.q(x_BxLxD), ("batch", "length", "act_heads", None))
        k_BxLxKxDh = constrain(self.k(x_BxLxD), ("batch", "length", "act_kv_heads", None))
        v_BxLxKxDh = constrain(self.v(x_BxLxD), ("batch", "length", "act_kv_heads", None))
        if self.cfg.position == "rope":
            q_BxLxHxDh = rope(q_BxLxHxDh, positions_BxL, self.cfg.rope_base)
            k_BxLxKxDh = rope(k_BxLxKxDh, positions_BxL, self.cfg.rope_base)
        # Named for remat policies: model.remat="qkv" keeps these and recomputes the rest.
        return (
            checkpoint_name(q_BxLxHxDh, "query"),
            checkpoint_name(k_BxLxKxDh, "key"),
            checkpoint_name(v_BxLxKxDh, "value"),
        )

    def _attend(
        self,
        q_BxLxHxDh: jax.Array,
        k_BxSxKxDh: jax.Array,
        v_BxSxKxDh: jax.Array,
        mask_BxLxS: jax.Array,
        positions: tuple[jax.Array, jax.Array] | None,
        bias_BxHxLxS: jax.Array | None,
        return_probs: bool,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The output projection of attention, and the probabilities if asked for.
        ``positions`` (queries', keys') feed ALiBi; cross-attention passes None."""
        cfg = self.cfg
        if cfg.position == "alibi" and positions is not None:
            alibi = alibi_bias(cfg.num_heads, *positions)
            bias_BxHxLxS = alibi if bias_BxHxLxS is None else bias_BxHxLxS + alibi
        out = cfg.attention(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
            scale=self.scale, return_probs=return_probs,
        )  # fmt: skip
        out_BxLxHxDh, probs_BxHxLxS = out if return_probs else (out, None)
        out_BxLxHxDh = constrain(out_BxLxHxDh, ("batch", "length", "act_heads", None))
        return self.o(out_BxLxHxDh), probs_BxHxLxS

    @property
    def scale(self) -> float:
        """1/sqrt(head_dim), or 1 for T5, which folds it into the initialisation."""
        return 1.0 / math.sqrt(self.cfg.head_dim) if self.cfg.scale_attention else 1.0

    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_BxLxS: jax.Array,
        positions_BxL: jax.Array,
        bias_BxHxLxS: jax.Array | None = None,
        *,
        return_probs: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Self-attention: the output, and with ``return_probs`` the probabilities
        ``[B, H, L, L]`` (else None). ``bias_BxHxLxS`` is an additive logit bias (T5's
        relative position bias), broadcastable over the batch."""
        q, k, v = self._qkv(x_BxLxD, positions_BxL)
        return self._attend(
            q, k, v, mask_BxLxS, (positions_BxL, positions_BxL), bias_BxHxLxS, return_probs
        )

    def memory_kv(self, memory_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys and values of the encoder output: computed once per
        source when decoding, instead of once per generated token."""
        k_BxSxKxDh = constrain(self.k(memory_BxSxD), ("batch", "length", "act_kv_heads", None))
        v_BxSxKxDh = constrain(self.v(memory_BxSxD), ("batch", "length", "act_kv_heads", None))
        return k_BxSxKxDh, v_BxSxKxDh

    def cross(
        self,
        x_BxLxD: jax.Array,
        memory_kv: tuple[jax.Array, jax.Array],
        mask_BxLxS: jax.Array,
        *,
        return_probs: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Cross-attention: queries from ``x``, keys and values :meth:`memory_kv` of the
        encoder output; returns as :meth:`__call__` does."""
        q_BxLxHxDh = constrain(self.q(x_BxLxD), ("batch", "length", "act_heads", None))
        k_BxSxKxDh, v_BxSxKxDh = (m.astype(q_BxLxHxDh.dtype) for m in memory_kv)
        return self._attend(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, None, None, return_probs
        )

    def decode(
        self,
        x_BxTxD: jax.Array,
        mask_BxTxS: jax.Array,
        positions_BxT: jax.Array,
        key_positions_BxS: jax.Array,
        kv_cache: dict[str, jax.Array],
        index: jax.Array,
        bias_BxHxTxS: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Attention for T new tokens against a KV cache of S slots.

        Their keys and values are written at slots ``[index, index + T)``; ``mask_BxTxS``
        says which slots each new token sees and ``key_positions_BxS`` holds every slot's
        position (already updated). Returns the output and the updated ``{k, v}`` cache.
        """
        q, k, v = self._qkv(x_BxTxD, positions_BxT)
        start = (0, index, 0, 0)
        kv_cache = {
            "k": jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start),
            "v": jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start),
        }
        out, _ = self._attend(
            q, kv_cache["k"].astype(q.dtype), kv_cache["v"].astype(q.dtype), mask_BxTxS,
            (positions_BxT, key_positions_BxS), bias_BxHxTxS, False,
        )  # fmt: skip
        return out, kv_cache


GATED = ("swiglu", "geglu")


@functools.partial(jax.checkpoint, static_argnums=(0,))
def mlp_activation(kind: str, up: jax.Array, gate: jax.Array | None) -> jax.Array:
    """The MLP nonlinearity ``kind`` (model.mlp) of the up projection, gated if it is.

    Recomputed in the backward pass from its inputs: autodiff would keep three more
    ``[B, L, F]`` intermediates of SwiGLU per layer (the sigmoid and two products), which
    the layer scan copies into its stacks; the 100M decoder's step needs 15% less memory
    (8.36 -> 7.08 GiB at 8 x 512), at the same speed on a CPU.
    """
    if kind == "swiglu":
        return jax.nn.silu(gate) * up
    if kind == "geglu":
        return jax.nn.gelu(gate, approximate=True) * up
    if kind in ("gelu", "gelu_exact"):
        return jax.nn.gelu(up, approximate=kind == "gelu")
    return jax.nn.relu(up)


class MLP(nnx.Module):
    """Feed-forward block: gated (SwiGLU, GeGLU) or plain (GELU, exact GELU, ReLU).

    ``gelu`` is the tanh approximation (GPT-2's ``gelu_new``), ``gelu_exact`` the erf form
    (BERT), ``geglu`` the gated tanh-GELU of T5.1.1.
    """

    def __init__(self, cfg, rngs: nnx.Rngs):
        common = dict(
            use_bias=cfg.use_bias,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        d, f = cfg.d_model, cfg.d_ff
        self.kind = cfg.mlp
        self.up = Dense((d,), (f,), ("embed", "mlp"), **common)
        self.gate = Dense((d,), (f,), ("embed", "mlp"), **common) if cfg.mlp in GATED else None
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.down = Dense((f,), (d,), ("mlp", "embed"), **{**common, "init_std": out_std})

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate_BxLxF = self.gate(x_BxLxD) if self.gate is not None else None
        h_BxLxF = mlp_activation(self.kind, self.up(x_BxLxD), gate_BxLxF)
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
        return self.down(h_BxLxF)


class TokenEmbeddings:
    """Token table (+ learned positions) in, logits out: shared by every model family.

    A mixin rather than a submodule, so the parameters keep their short names
    (``embed``, ``pos_embed``, ``lm_head``), which the Hugging Face mapping relies on.
    """

    def _init_embeddings(self, cfg: Any, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = param(
            rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype
        )
        self.pos_embed = (
            param(rngs, init, (cfg.max_len, cfg.d_model), ("positions", "embed"), cfg.param_dtype)
            if cfg.position == "learned"
            else None
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Dense(
                (cfg.d_model,),
                (cfg.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                init_std=cfg.init_std,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                rngs=rngs,
            )  # fmt: skip
        )

    def _embed(
        self, tokens_BxL: jax.Array, positions_BxL: jax.Array, key: jax.Array | None
    ) -> jax.Array:
        cfg = self.cfg
        # The lookup reads a gathered copy of the table: a gather from a vocab-sharded
        # table would make XLA replicate it anyway, through a slower path.
        table_VxD = constrain(self.embed[...], (None, None))
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(cfg.dtype)
        if cfg.scale_embeddings:
            x_BxLxD = x_BxLxD * math.sqrt(cfg.d_model)
        if cfg.position == "learned":
            pos_BxLxD = jnp.take(self.pos_embed[...], positions_BxL, axis=0)
            x_BxLxD = x_BxLxD + pos_BxLxD.astype(cfg.dtype)
        elif cfg.position == "sinusoidal":
            x_BxLxD = x_BxLxD + sinusoidal(positions_BxL, cfg.d_model).astype(cfg.dtype)
        x_BxLxD = dropout(x_BxLxD, cfg.dropout, key)
        return constrain(x_BxLxD, ("batch", "length", "act_embed"))

    def output_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """Float32 logits from the tied table or the separate head."""
        if self.lm_head is not None:
            logits_BxLxV = self.lm_head(x_BxLxD).astype(jnp.float32)
        else:
            table_VxD = self.embed[...].astype(self.cfg.dtype)
            logits_BxLxV = tied_logits(x_BxLxD.astype(self.cfg.dtype), table_VxD)
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))


def stack_hidden(
    captured: dict[str, jax.Array], final_BxLxD: jax.Array, prefix: str
) -> dict[str, jax.Array]:
    """A stack's per-layer captures -> introspection outputs, in Hugging Face's layout.

    ``{prefix}hidden_states`` ``[N + 1, B, L, D]`` holds every layer's input, then the
    stack's final output (after its final norm, if it has one); every captured
    ``*attention`` ``[N, B, H, L, S]`` keeps its name under the prefix.
    """
    out = {
        f"{prefix}hidden_states": jnp.concatenate(
            [captured["hidden"], final_BxLxD[None].astype(captured["hidden"].dtype)]
        )
    }
    out.update({f"{prefix}{k}": v for k, v in captured.items() if k != "hidden"})
    return out
