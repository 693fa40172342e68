"""Transformer building blocks as Flax NNX modules: only math and logical axis names.

Tensor names carry their shape: B batch, L length (queries), S length (keys), D model
width, H query heads, K key/value heads, G query heads per KV head, Dh head width,
F MLP width, V vocabulary. Parameters are float32 and cast to the compute dtype at use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.parallel import constrain

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
        contract = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
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
        x = x_BxLxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        x = x * self.scale[...]
        if self.bias is not None:
            x = x + self.bias[...]
        return x.astype(self.dtype)


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


def attention_mask(segment_ids_BxL: jax.Array, causal: bool) -> jax.Array:
    """True where query i may attend to key j: same (non-padding) document, and j <= i."""
    seg_q, seg_k = segment_ids_BxL[:, :, None], segment_ids_BxL[:, None, :]
    mask_BxLxS = (seg_q == seg_k) & (seg_q > 0)
    if causal:
        length = segment_ids_BxL.shape[1]
        mask_BxLxS &= jnp.tril(jnp.ones((length, length), bool))[None]
    return mask_BxLxS


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

    def __call__(
        self, x_BxLxD: jax.Array, mask_BxLxS: jax.Array, positions_BxL: jax.Array
    ) -> jax.Array:
        cfg = self.cfg
        q_BxLxHxDh = constrain(self.q(x_BxLxD), ("batch", "length", "act_heads", None))
        k_BxSxKxDh = constrain(self.k(x_BxLxD), ("batch", "length", "act_kv_heads", None))
        v_BxSxKxDh = constrain(self.v(x_BxLxD), ("batch", "length", "act_kv_heads", None))
        if cfg.position == "rope":
            q_BxLxHxDh = rope(q_BxLxHxDh, positions_BxL, cfg.rope_base)
            k_BxSxKxDh = rope(k_BxSxKxDh, positions_BxL, cfg.rope_base)
        b, length, h, dh = q_BxLxHxDh.shape
        kv = k_BxSxKxDh.shape[2]
        q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, length, kv, h // kv, dh) / math.sqrt(dh)
        att_BxKxGxLxS = jnp.einsum(
            "blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh, preferred_element_type=jnp.float32
        )
        att_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], att_BxKxGxLxS, -1e30)
        probs_BxKxGxLxS = jax.nn.softmax(att_BxKxGxLxS, axis=-1).astype(cfg.dtype)
        out_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", probs_BxKxGxLxS, v_BxSxKxDh)
        out_BxLxHxDh = constrain(
            out_BxLxKxGxDh.reshape(b, length, h, dh), ("batch", "length", "act_heads", None)
        )
        return self.o(out_BxLxHxDh)


class MLP(nnx.Module):
    """Feed-forward block: gated (SwiGLU) or plain (GELU, ReLU)."""

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
        self.gate = Dense((d,), (f,), ("embed", "mlp"), **common) if cfg.mlp == "swiglu" else None
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.down = Dense((f,), (d,), ("mlp", "embed"), **{**common, "init_std": out_std})

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = self.up(x_BxLxD)
        if self.kind == "swiglu":
            h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * h_BxLxF
        elif self.kind == "gelu":
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        else:
            h_BxLxF = jax.nn.relu(h_BxLxF)
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
        return self.down(h_BxLxF)
