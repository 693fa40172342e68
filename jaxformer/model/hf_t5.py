"""Hugging Face interop for T5: ``T5ForConditionalGeneration`` weights in and out of :class:`T5`.

The config translation and the name/shape map (two stacks, a bias table per stack, the
shared embedding's aliases); the conversion itself is :mod:`jaxformer.model.hf_common`'s.
``torch``/``transformers`` are imported lazily. T5 1.0 (``feed_forward_proj='relu'``,
tied, decoder output scaled by d_model^-0.5) and T5.1.1 (``'gated-gelu'``, untied head, no
scaling) are supported. transformers 5 always reports ``tie_word_embeddings=True`` for T5
and keeps the scaling in ``scale_decoder_outputs``; an untied checkpoint simply has a
different ``lm_head.weight``.

    model = hf_t5.import_hf_t5(torch_model, hf_t5.config_from_hf_t5(torch_model.config))
    hf_t5.export_hf_t5(model).save_pretrained("out/")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxformer.config import base_config
from jaxformer.model import hf_common as hfc
from jaxformer.model.decoder import ModelConfig
from jaxformer.model.t5 import T5


def _tied(hf_config: Any) -> bool:
    """Whether the head is tied (and the decoder output scaled): T5 1.0 yes, T5.1.1 no."""
    scale = hfc.get(hf_config, "scale_decoder_outputs")
    return bool(hfc.get(hf_config, "tie_word_embeddings", True) if scale is None else scale)


def config_from_hf_t5(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config for a transformers ``T5Config`` (or config.json dict)."""
    proj = hfc.get(hf_config, "feed_forward_proj", "relu")
    mlp = {"relu": "relu", "gated-gelu": "geglu"}.get(proj)
    if mlp is None:
        raise ValueError(f"T5 feed_forward_proj {proj!r} is not supported (relu, gated-gelu)")
    c = base_config()
    m = c.model
    m.family = "t5"
    m.vocab_size = int(hfc.need(hf_config, "vocab_size"))
    m.d_model = int(hfc.need(hf_config, "d_model"))
    m.d_ff = int(hfc.need(hf_config, "d_ff"))
    m.num_heads = int(hfc.need(hf_config, "num_heads"))
    m.head_dim = int(hfc.need(hf_config, "d_kv"))
    m.num_encoder_layers = int(hfc.need(hf_config, "num_layers"))
    m.num_layers = int(hfc.get(hf_config, "num_decoder_layers") or m.num_encoder_layers)
    m.relative_buckets = int(hfc.get(hf_config, "relative_attention_num_buckets", 32))
    m.relative_max_distance = int(hfc.get(hf_config, "relative_attention_max_distance", 128))
    m.norm_eps = float(hfc.get(hf_config, "layer_norm_epsilon", 1e-6))
    m.position = "none"
    m.norm, m.norm_position, m.mlp = "rmsnorm", "pre", mlp
    m.use_bias = False
    m.tie_embeddings = _tied(hf_config)
    m.scale_embeddings = False
    m.scale_attention = False
    m.max_len = 512
    return c


# Keys that change the function a set of T5 weights computes.
_ARCH_KEYS = (
    "family", "vocab_size", "d_model", "d_ff", "num_heads", "head_dim", "num_encoder_layers",
    "num_layers", "relative_buckets", "relative_max_distance", "norm_eps", "position", "norm",
    "norm_position", "mlp", "use_bias", "tie_embeddings", "scale_embeddings", "scale_attention",
)  # fmt: skip


def hf_t5_config_dict(m: ModelConfig) -> dict[str, Any]:
    """The ``T5Config`` fields (config.json, without ``model_type``) of a jaxformer T5."""
    return dict(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.d_ff,
        num_layers=m.num_encoder_layers, num_decoder_layers=m.num_layers,
        num_heads=m.num_heads, relative_attention_num_buckets=m.relative_buckets,
        relative_attention_max_distance=m.relative_max_distance, layer_norm_epsilon=m.norm_eps,
        feed_forward_proj={"relu": "relu", "geglu": "gated-gelu"}[m.mlp],
        tie_word_embeddings=m.tie_embeddings, dropout_rate=m.dropout,
    )  # fmt: skip


def hf_t5_config(m: ModelConfig, **kwargs: Any) -> Any:
    """The transformers ``T5Config`` for a jaxformer T5 config."""
    import transformers

    return transformers.T5Config(**hf_t5_config_dict(m), **kwargs)


def _weights(m: ModelConfig) -> list[hfc.Weight]:
    """T5ForConditionalGeneration's names. ``nn.Linear`` weights, ``[out, in]``, no biases;
    each stack's bias table lives in its first block."""
    ups = [("wi_0", "gate"), ("wi_1", "up")] if m.mlp == "geglu" else [("wi", "up")]
    out = [
        hfc.weight("shared.weight", ("embed",)),
        # transformers names the shared embedding three more times (the head, if tied).
        hfc.weight("encoder.embed_tokens.weight", ("embed",), alias=True),
        hfc.weight("decoder.embed_tokens.weight", ("embed",), alias=True),
        hfc.lm_head(m.tie_embeddings),
    ]
    for stack, layers in (("encoder", m.num_encoder_layers), ("decoder", m.num_layers)):
        table = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out.append(hfc.weight(table, (f"{stack}_relative_bias", "table")))
        out += hfc.norm(f"{stack}.final_layer_norm", (f"{stack}_norm",), bias=False)
        for i in range(layers):
            p, b = f"{stack}.block.{i}.layer.", (stack, i)
            sublayers = [(0, "SelfAttention", "attn")]
            if stack == "decoder":
                sublayers.append((1, "EncDecAttention", "cross"))
            for j, hf, ours in sublayers:
                attn = [f"{p}{j}.{hf}.{n}" for n in "qkvo"]
                out += hfc.attention(attn, (*b, ours), m, bias=False)
                out += hfc.norm(f"{p}{j}.layer_norm", (*b, f"{ours}_norm"), bias=False)
            f = len(sublayers)  # the feed-forward sublayer
            for hf, ours in (*ups, ("wo", "down")):
                mlp = f"{p}{f}.DenseReluDense.{hf}"
                out += hfc.dense(mlp, (*b, "mlp", ours), hfc.TRANSPOSED, None)
            out += hfc.norm(f"{p}{f}.layer_norm", (*b, "mlp_norm"), bias=False)
    return out


def _stacks(m: ModelConfig) -> dict[str, int]:
    return {"encoder": m.num_encoder_layers, "decoder": m.num_layers}


# transformers' decoder cross-attention never has a bias table, old checkpoints do.
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def jax_state_from_hf_t5(state_dict: Mapping[str, Any], cfg: Any) -> dict:
    """A nested pure dict of T5 parameters from a HF state dict; checks names and shapes."""
    return hfc.nest(_params_from_hf(state_dict, hfc.model_config(cfg)))


def _params_from_hf(state_dict: Mapping[str, Any], m: ModelConfig) -> dict:
    expected = hfc.expected_params(lambda rngs: T5(m, rngs))
    return hfc.params_from_hf(
        state_dict, _weights(m), expected, family="T5", stacks=_stacks(m), ignored=_IGNORED
    )


def import_hf_t5(source: Any, cfg: Any = None, *, seed: int = 0) -> T5:
    """A :class:`T5` holding the weights of a transformers T5 model or state dict.

    ``cfg`` (a full config, its model section or a ModelConfig) defaults to
    ``config_from_hf_t5(source.config)``; a bare state dict needs it.
    """
    m, state_dict, _ = hfc.read_source(source, cfg, config_from_hf_t5, "import_hf_t5")
    return hfc.build_model(lambda rngs: T5(m, rngs), _params_from_hf(state_dict, m), seed)


def hf_t5_state_dict(model: T5) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names, as numpy arrays (no torch needed)."""
    return hfc.params_to_hf(model, _weights(model.cfg), _stacks(model.cfg))


def export_hf_t5(model: T5, cfg: Any = None, *, attn_implementation: str | None = None) -> Any:
    """The model as an eval-mode transformers ``T5ForConditionalGeneration`` (float32)."""
    import torch
    import transformers

    m = model.cfg
    if cfg is not None and hfc.model_config(cfg) != m:
        raise ValueError("cfg does not describe the model being exported")
    config = hf_t5_config(m, **hfc.config_kwargs(attn_implementation))
    hf_model = transformers.T5ForConditionalGeneration(config)
    tensors = hfc.to_torch(hf_t5_state_dict(model))
    if not m.tie_embeddings:
        # transformers ties T5's head regardless of the config: untie it, and drop it from
        # the tied keys so save_pretrained writes it.
        hf_model.lm_head.weight = torch.nn.Parameter(tensors["lm_head.weight"].clone())
        tied = getattr(hf_model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop("lm_head.weight", None)
    return hfc.loaded(hf_model, tensors)


# -- checkpoint directories ---------------------------------------------------------------


def _dir_config(hf_config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """config.json says all a T5 needs: the shapes add nothing."""
    del shapes
    return config_from_hf_t5(hf_config)


def _dir_import(state_dict: Mapping[str, Any], cfg: Any, seed: int) -> T5:
    return import_hf_t5(state_dict, cfg, seed=seed)


def _dir_export(model: T5) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json (``scale_decoder_outputs`` too: transformers 5 reads the tying from it)
    and the tensors; an untied head is written under ``lm_head.weight``."""
    m = model.cfg
    fields = hf_t5_config_dict(m)
    fields.update(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        is_encoder_decoder=True,
        scale_decoder_outputs=m.tie_embeddings,
    )
    return fields, hfc.params_to_hf(model, _weights(m), _stacks(m), aliases=False)


# What hf_common.load_hf_dir / save_hf_dir need of T5.
DIR_FAMILIES = (hfc.Family("t5", "t5", _dir_config, _ARCH_KEYS, _dir_import, _dir_export),)


__all__ = [
    "DIR_FAMILIES",
    "config_from_hf_t5",
    "export_hf_t5",
    "hf_t5_config",
    "hf_t5_config_dict",
    "hf_t5_state_dict",
    "import_hf_t5",
    "jax_state_from_hf_t5",
]
