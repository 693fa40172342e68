"""Matrix products with custom backward passes, for speed on particular backends.

Each gives exactly autodiff's gradient (in float32); they differ in how the backward
products are laid out (XLA:CPU) or in which dtype they run (bf16 on GPUs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


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
