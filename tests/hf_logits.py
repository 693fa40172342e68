"""Logits of jaxformer models on fixed random tokens, shared by the Hugging Face tests."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB, BATCH, SEQ, SRC = 128, 2, 16, 12


def tokens(seed: int, length: int = SEQ) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, length)).astype(np.int32)


def positions(length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (BATCH, length))


@nnx.jit
def decoder_logits(model: Any, tokens: jax.Array) -> jax.Array:
    return model(tokens, jnp.ones_like(tokens), positions(tokens.shape[1]))


@nnx.jit
def bert_logits(model: Any, tokens: jax.Array) -> jax.Array:
    ones = jnp.ones_like(tokens)
    return model(tokens, ones, positions(tokens.shape[1]), jnp.zeros_like(tokens))["mlm_logits"]


@nnx.jit
def t5_logits(model: Any, src: jax.Array, tgt: jax.Array) -> jax.Array:
    batch = {
        "encoder_inputs": src,
        "encoder_segment_ids": jnp.ones_like(src),
        "encoder_positions": positions(src.shape[1]),
        "inputs": tgt,
        "segment_ids": jnp.ones_like(tgt),
        "positions": positions(tgt.shape[1]),
    }
    return model.apply_batch(batch)[0]
