"""The model section of a config as the model code reads it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxformer.attention.reference import EINSUM, Einsum
from jaxformer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model section of a config, with defaults resolved and dtypes as numpy types."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_len: int
    position: str
    rope_base: float
    norm: str
    norm_position: str
    norm_eps: float
    mlp: str
    use_bias: bool
    tie_embeddings: bool
    dropout: float
    scan_layers: bool
    remat: str
    sliding_window: int
    moe_experts: int
    moe_top_k: int
    moe_capacity_factor: float
    moe_d_ff: int
    moe_aux_loss: float
    moe_z_loss: float
    family: str
    num_encoder_layers: int
    scale_embeddings: bool
    scale_attention: bool
    type_vocab_size: int
    relative_buckets: int
    relative_max_distance: int
    dtype: Any
    param_dtype: Any
    init_std: float
    # The attention backend every layer calls (jaxformer/attention/registry.py: select);
    # the einsum reference unless one was selected for this model.
    attention: Einsum = EINSUM

    @classmethod
    def from_config(cls, model_cfg: Any, attention: Einsum | None = None) -> ModelConfig:
        """The model section resolved, calling the attention backend ``attention``
        (``jaxformer.attention.registry.select``'s). Without one, the einsum reference,
        which is what ``auto`` runs on CPUs: any other ``model.attention_impl`` needs its
        backend passed, so that it is never dropped without a word."""
        if attention is None:
            impl = model_cfg.get("attention_impl", "auto")
            if impl not in ("auto", "einsum"):
                raise ValueError(
                    f"model.attention_impl={impl!r} needs its backend: build the model "
                    "through jaxformer.tasks (build_model, model_config)"
                )
            attention = EINSUM
        names = [f.name for f in dataclasses.fields(cls) if f.name != "attention"]
        values: dict[str, Any] = {name: model_cfg[name] for name in names}
        values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
        values["head_dim"] = values["head_dim"] or values["d_model"] // values["num_heads"]
        values["num_encoder_layers"] = values["num_encoder_layers"] or values["num_layers"]
        values["dtype"] = jnp.dtype(values["dtype"])
        values["param_dtype"] = jnp.dtype(values["param_dtype"])
        return cls(**values, attention=attention)


def validate_model(cfg: ml_collections.ConfigDict) -> None:
    """The model section's own checks: head counts that divide, RoPE's even head width,
    and sequence lengths the positions support."""
    m, d = cfg.model, cfg.data
    num_kv = m.num_kv_heads or m.num_heads
    if m.num_heads % num_kv:
        raise ConfigError(
            f"config key 'model.num_kv_heads' ({num_kv}) must divide model.num_heads "
            f"({m.num_heads})"
        )
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(
            f"config key 'model.num_heads' ({m.num_heads}) must divide model.d_model "
            f"({m.d_model}) unless model.head_dim is set"
        )
    if d.source_seq_len > m.max_len:
        raise ConfigError(
            f"config key 'data.source_seq_len' ({d.source_seq_len}) is above the "
            f"model's limit model.max_len ({m.max_len})"
        )
    if d.seq_len > m.max_len:
        raise ConfigError(
            f"config key 'data.seq_len' ({d.seq_len}) is above the model's limit "
            f"model.max_len ({m.max_len})"
        )
    if m.position == "rope" and (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("config key 'model.head_dim' must be even for RoPE")
