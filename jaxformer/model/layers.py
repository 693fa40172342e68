"""Transformer building blocks as Flax NNX modules: only math and logical axis names.

Tensor names carry their shape: B batch, L length (queries), S length (keys), D model
width, H query heads, K key/value heads, G query heads per KV head, Dh head width,
F MLP width, V vocabulary. Parameters are float32 and cast to the compute dtype at use.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxformer.model.splash_attention import splash_attention
from jaxformer.parallel import constrain, ring_attention, sequence_sharded

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract_last(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """x's last ``n`` axes contracted with w's first ``n``: ``[..., IN] x [IN, OUT] -> [..., OUT]``.

    The same product as ``jax.lax.dot_general``, with a custom weight gradient. XLA:CPU
    runs a product that contracts leading axes by first copying its left operand
    transposed; autodiff always puts the cotangent ``g`` on the left (``(g^T x)^T``), so
    every ``[B, L, OUT]`` cotangent (and the ``[B, L, V]`` logits' one) was copied. Here the
    narrower of x and g goes on the left: this halved the train step of a 4-layer,
    32k-vocabulary decoder on a CPU (docs/performance.md).
    """
    contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    return jax.lax.dot_general(x, w, (contract, ((), ())))


def _contract_last_fwd(x: jax.Array, w: jax.Array, n: int) -> tuple[jax.Array, tuple]:
    return contract_last(x, w, n), (x, w)


def _contract_last_bwd(n: int, saved: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = saved
    lead = tuple(range(x.ndim - n))  # x's (and g's) leading axes
    g_out = tuple(range(len(lead), g.ndim))
    dx = jax.lax.dot_general(g, w, ((g_out, tuple(range(n, w.ndim))), ((), ())))
    if math.prod(x.shape[len(lead) :]) <= math.prod(g.shape[len(lead) :]):
        dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))
    else:  # XLA:CPU copies the left operand transposed: make that the narrower one
        dw_t = jax.lax.dot_general(g, x, ((lead, lead), ((), ())))  # [OUT..., IN...]
        out_axes = tuple(range(len(g_out)))
        dw = dw_t.transpose(*(a + len(g_out) for a in range(n)), *out_axes)
    return dx.astype(x.dtype), dw.astype(w.dtype)


contract_last.defvjp(_contract_last_fwd, _contract_last_bwd)


@jax.custom_vjp
def tied_logits(x_BxLxD: jax.Array, table_VxD: jax.Array) -> jax.Array:
    """Float32 logits ``x @ table^T`` from operands in the compute dtype, whose backward
    products run in that dtype too.

    Left to autodiff, the float32 cotangent of float32 logits meets the bf16 operands and
    both backward products of the vocabulary projection run in float32 (on an H100, GPT-2
    124M's took 35 ms of a 126 ms step, its bf16 forward 7.8 ms). Here the cotangent is cast
    to the operands' dtype first, as the untied head's ``Dense(...).astype(float32)`` does;
    products accumulate in float32. In float32 this is exactly autodiff's gradient.
    """
    return jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x_BxLxD: jax.Array, table_VxD: jax.Array) -> tuple[jax.Array, tuple]:
    return tied_logits(x_BxLxD, table_VxD), (x_BxLxD, table_VxD)


def _tied_logits_bwd(saved: tuple, g_BxLxV: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_BxLxD, table_VxD = saved
    g_BxLxV = g_BxLxV.astype(x_BxLxD.dtype)
    f32 = jnp.float32
    dx_BxLxD = jnp.einsum("blv,vd->bld", g_BxLxV, table_VxD, preferred_element_type=f32)
    dtable_VxD = jnp.einsum("blv,bld->vd", g_BxLxV, x_BxLxD, preferred_element_type=f32)
    return dx_BxLxD.astype(x_BxLxD.dtype), dtable_VxD.astype(table_VxD.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


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


def self_attention_mask(
    segment_ids_BxL: jax.Array,
    positions_BxL: jax.Array,
    causal: bool,
    window: int = 0,
    *,
    keep_unbuilt: bool = False,
) -> SegmentMask:
    """The mask a stack's layers share, its dense form built once outside the layer loop;
    left unbuilt when sequence parallelism will build it block by block, or when
    ``keep_unbuilt`` (the splash kernel builds its own from the segment ids)."""
    mask = SegmentMask(segment_ids_BxL, positions_BxL, causal=causal, window=window)
    if keep_unbuilt or sequence_sharded(segment_ids_BxL.shape[1]):
        return mask
    return mask.replace(dense_BxLxL=mask.dense())


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


def dot_product_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask_BxLxS: jax.Array | SegmentMask,
    bias_BxHxLxS: jax.Array | None,
    *,
    implementation: str,
    scale: float,
    return_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax(q k^T * scale + bias, masked) v with grouped KV heads.

    ``einsum`` is the reference: plain XLA ops, float32 logits; causal self-attention
    (a causal :class:`SegmentMask`) runs in query blocks that skip the keys masked for a
    whole block (:func:`causal_blocks`), the same numbers with less work. ``dot_product`` calls
    ``jax.nn.dot_product_attention`` with cuDNN's fused kernel where it runs
    (:func:`sdpa_backend`) and XLA's elsewhere. ``return_probs`` (introspection) also returns the
    float32 probabilities ``[B, H, L, S]``, which only the einsum path materialises.
    ``splash`` runs the Pallas splash kernel (TPU; jaxformer/model/splash_attention.py)
    on a :class:`SegmentMask`. A :class:`SegmentMask` whose length the active mesh splits
    runs ring attention (jaxformer.parallel.ring_attention) instead.
    """
    blocks = None  # causal self-attention: the query blocks of causal_blocks
    if isinstance(mask_BxLxS, SegmentMask):
        if not return_probs and sequence_sharded(q_BxLxHxDh.shape[1]):
            return ring_attention(
                q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS.segment_ids_BxL,
                mask_BxLxS.positions_BxL, bias_BxHxLxS, causal=mask_BxLxS.causal,
                window=mask_BxLxS.window, scale=scale,
            )  # fmt: skip
        if implementation == "splash" and not return_probs:
            return splash_attention(
                q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS.segment_ids_BxL, bias_BxHxLxS,
                causal=mask_BxLxS.causal, window=mask_BxLxS.window, scale=scale,
            )  # fmt: skip
        if mask_BxLxS.causal and q_BxLxHxDh.shape[1] == k_BxSxKxDh.shape[1]:
            blocks = causal_blocks(q_BxLxHxDh.shape[1], mask_BxLxS.window)
            plain_causal = mask_BxLxS.window == 0 and bias_BxHxLxS is None and not return_probs
            fused = implementation == "dot_product" and _skip_mask_when_unpacked(q_BxLxHxDh)
            if fused and plain_causal:
                return _causal_attention_unmasked_when_unpacked(
                    q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, scale
                )
        mask_BxLxS = mask_BxLxS.dense()
    h, kv = q_BxLxHxDh.shape[2], k_BxSxKxDh.shape[2]
    if implementation == "dot_product" and not return_probs:
        return _jax_nn_attention(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS, scale,
            causal=blocks is not None,
        )  # fmt: skip
    # Each KV head repeated for its group of query heads: 4-D products, which XLA:CPU runs
    # 1.5-1.8x faster forward + backward than grouping the queries as [B, L, K, G, Dh].
    k_BxSxHxDh = jnp.repeat(k_BxSxKxDh, h // kv, axis=2) if kv < h else k_BxSxKxDh
    v_BxSxHxDh = jnp.repeat(v_BxSxKxDh, h // kv, axis=2) if kv < h else v_BxSxKxDh
    if blocks is None or return_probs or len(blocks) == 1:
        return _softmax_attention(
            q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxLxS, bias_BxHxLxS, scale, return_probs
        )
    return _causal_blocks_attention(
        q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxLxS, bias_BxHxLxS, scale, tuple(blocks)
    )


@functools.partial(
    jax.checkpoint,
    policy=jax.checkpoint_policies.save_only_these_names("attention_probs"),
    static_argnums=(5, 6),
)
def _causal_blocks_attention(
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
            _softmax_attention(
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


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def sdpa_backend(platform: str, dtype: Any, head_dim: int) -> str:
    """The ``implementation`` of ``jax.nn.dot_product_attention`` to ask for.

    jax picks XLA's unfused attention when none is named (``implementation=None``), even
    on GPUs, so the fused cuDNN kernel has to be requested: on a GPU, for bf16/fp16 inputs
    and head dims cuDNN's flash kernel takes (a multiple of 8, at most 128).
    """
    fits = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if platform == "gpu" and fits else "xla"


def attention_implementation(
    name: str, dtype: Any, head_dim: int, *, causal_self: bool, platform: str | None = None
) -> str:
    """``model.attention_impl`` resolved: ``auto`` is ``dot_product`` for causal
    self-attention without a logit bias (decoder LMs: the case measured on GPUs) where
    cuDNN's fused kernel runs (:func:`sdpa_backend`: GPUs, bf16/fp16, head dims it takes),
    and the ``einsum`` reference elsewhere (CPUs, float32, TPUs, where ``splash`` is asked
    for by name; encoders, cross-attention, ALiBi and T5 biases); other names are kept."""
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    fused = causal_self and sdpa_backend(platform, dtype, head_dim) == "cudnn"
    return "dot_product" if fused else "einsum"


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


def _softmax_attention(
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
        causal_self = isinstance(mask_BxLxS, SegmentMask) and mask_BxLxS.causal
        implementation = attention_implementation(
            cfg.attention_impl, cfg.dtype, cfg.head_dim,
            causal_self=causal_self and bias_BxHxLxS is None,
        )  # fmt: skip
        out = dot_product_attention(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
            implementation=implementation, scale=self.scale, return_probs=return_probs,
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

    def _output_logits(self, x_BxLxD: jax.Array) -> jax.Array:
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
