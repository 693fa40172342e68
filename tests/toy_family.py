"""A toy model family for tests, added as docs/architecture.md's "Adding a model family"
says: this one file (the model and its task) plus one registry line.

A bigram language model: each token's logits come from its own embedding alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import flops
from jaxformer.model.config import ModelConfig
from jaxformer.model.layers import Dense, param
from jaxformer.tasks.base import Task


class BigramLM(nnx.Module):
    """Next-token logits from the current token's embedding: no attention, no layers."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        shape = (cfg.vocab_size, cfg.d_model)
        self.embed = param(rngs, init, shape, ("vocab", "embed"), cfg.param_dtype)
        self.out = Dense(
            (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=True,
            init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip

    def apply_batch(
        self, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None, **_: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits aligned with ``batch["targets"]`` and no aux values."""
        x_BxLxD = jnp.take(self.embed[...], batch["inputs"], axis=0).astype(self.cfg.dtype)
        return self.out(x_BxLxD).astype(jnp.float32), {}


@dataclasses.dataclass(frozen=True)
class BigramTask(Task):
    """``model.family = "bigram"``: plain-text batches, the base class's loss and data."""

    name: str = "bigram"
    model_class: type[nnx.Module] = BigramLM
    ignored_keys: tuple[str, ...] = ("model.num_layers", "model.d_ff", "model.num_heads")

    def count_flops(self, model_cfg: Any, seq_len: int) -> flops.FlopCount:
        d, v = model_cfg.d_model, model_cfg.vocab_size
        params = v * d + d * v + v
        return flops.FlopCount(params, v * d, d * v, 0, 3 * 2 * d * v)


BIGRAM = BigramTask()
