"""``T5ForConditionalGeneration`` weights in and out of :class:`jaxformer.model.T5`.

The config translation (checked both ways, :mod:`jaxformer.hf.common`) and the
name/shape map (two stacks, a bias table per stack, the shared embedding's aliases); the
map's walk is :mod:`jaxformer.hf.mapping`'s. ``torch``/``transformers`` are imported
lazily. T5 1.0 (``feed_forward_proj='relu'``, tied, decoder output scaled by
d_model^-0.5) and T5.1.1 (``'gated-gelu'``, untied head, no scaling) are supported, and
the other feed-forward projections jaxformer has an MLP for (``gated-silu``, ``gelu``,
``gelu_new``). transformers 5 always reports ``tie_word_embeddings=True`` for T5 and keeps
the scaling in ``scale_decoder_outputs``; an untied checkpoint simply has a different
``lm_head.weight``. T5 has no biases, no embedding scaling, no LayerNorm, no 1/sqrt(d_k)
logit scaling and no grouped KV heads: a jaxformer T5 with any of them is refused.

    model = hf.import_hf_t5(torch_model, hf.config_from_hf_t5(torch_model.config))
    hf.export_hf_t5(model).save_pretrained("out/")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxformer.config import base_config
from jaxformer.hf import common
from jaxformer.hf import mapping as hfm
from jaxformer.hf.model_type import HFModelType
from jaxformer.model import T5, ModelConfig
from jaxformer.tasks.t5 import T5_SPAN_CORRUPTION

# Keys that change the function a set of T5 weights computes (max_len, rope_base, the
# moe_* keys, sliding_window and BERT's keys do not apply to a T5).
ARCH_KEYS = (
    "family", "vocab_size", "d_model", "d_ff", "num_heads", "num_kv_heads", "head_dim",
    "num_encoder_layers", "num_layers", "relative_buckets", "relative_max_distance",
    "norm_eps", "position", "norm", "norm_position", "mlp", "use_bias", "tie_embeddings",
    "scale_embeddings", "scale_attention",
)  # fmt: skip

# (is_gated_act, dense_act_fn), the fields transformers' T5 layers read, -> model.mlp.
# transformers derives them from feed_forward_proj ('gated-gelu' is the tanh GELU,
# dense_act_fn 'gelu_new', as jaxformer's geglu; 'gelu' is the exact one), but a config
# that stores them keeps its own.
_MLPS = {
    (False, "relu"): "relu",
    (False, "gelu"): "gelu_exact",
    (False, "gelu_new"): "gelu",
    (True, "gelu_new"): "geglu",
    (True, "silu"): "swiglu",
}
# model.mlp -> feed_forward_proj.
_PROJS = {
    "relu": "relu",
    "gelu_exact": "gelu",
    "gelu": "gelu_new",
    "geglu": "gated-gelu",
    "swiglu": "gated-silu",
}

# What every T5 is, besides its sizes.
_FIXED = {
    "family": T5_SPAN_CORRUPTION.name,
    "position": "none",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "use_bias": False,
    "scale_embeddings": False,
    "scale_attention": False,
}

_TIED_HEAD = (
    "model.tie_embeddings=True: jaxformer's T5 ties its head to the shared embedding "
    "exactly when it scales the decoder output (Hugging Face scale_decoder_outputs)"
)


def _tied(hf_config: Any) -> bool:
    """Whether the head is tied (and the decoder output scaled): T5 1.0 yes, T5.1.1 no."""
    scale = common.get(hf_config, "scale_decoder_outputs")
    return bool(common.get(hf_config, "tie_word_embeddings", True) if scale is None else scale)


def _mlp(hf_config: Any) -> str:
    """``model.mlp`` of what transformers' T5 computes: ``is_gated_act`` and
    ``dense_act_fn`` where the config has them, else as derived from
    ``feed_forward_proj``."""
    proj = common.get(hf_config, "feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = common.get(hf_config, "is_gated_act")
    act = common.get(hf_config, "dense_act_fn")
    gated = parts[0] == "gated" if gated is None else bool(gated)
    act = ("gelu_new" if proj == "gated-gelu" else parts[-1]) if act is None else act
    if (gated, act) not in _MLPS:
        raise ValueError(
            f"T5 feed_forward_proj {proj!r} (is_gated_act={gated}, dense_act_fn={act!r}) "
            "is not supported: jaxformer has no MLP (model.mlp) computing it; it has "
            f"{', '.join(_PROJS.values())}"
        )
    return _MLPS[(gated, act)]


def config_from_hf_t5(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config for a transformers ``T5Config`` (or config.json dict);
    raises ValueError, naming the field, for what jaxformer's T5 cannot compute."""
    mlp = _mlp(hf_config)
    c = base_config()
    m = c.model
    m.update(_FIXED)
    m.vocab_size = int(common.need(hf_config, "vocab_size"))
    m.d_model = int(common.need(hf_config, "d_model"))
    m.d_ff = int(common.need(hf_config, "d_ff"))
    m.num_heads = int(common.need(hf_config, "num_heads"))
    m.num_kv_heads = 0
    m.head_dim = int(common.need(hf_config, "d_kv"))
    m.num_encoder_layers = int(common.need(hf_config, "num_layers"))
    m.num_layers = int(common.get(hf_config, "num_decoder_layers") or m.num_encoder_layers)
    m.relative_buckets = int(common.get(hf_config, "relative_attention_num_buckets", 32))
    m.relative_max_distance = int(common.get(hf_config, "relative_attention_max_distance", 128))
    m.norm_eps = float(common.get(hf_config, "layer_norm_epsilon", 1e-6))
    m.mlp = mlp
    m.tie_embeddings = _tied(hf_config)
    m.max_len = 512
    return c


def _check_t5(m: ModelConfig) -> None:
    """Raises, naming ``model.KEY``, unless ``m`` is a model a transformers T5 holds."""
    want: dict[str, Any] = {**_FIXED, "num_kv_heads": m.num_heads}
    if m.mlp not in _PROJS:
        want["mlp"] = "relu"
    common.check_supported(m, want, "T5")


def hf_t5_config_dict(cfg: Any) -> dict[str, Any]:
    """The ``T5Config`` fields (config.json, without ``model_type``) of a jaxformer T5;
    raises ValueError naming each ``model.KEY`` T5 cannot carry."""
    m = common.model_config(cfg)
    _check_t5(m)
    out = dict(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.d_ff,
        num_layers=m.num_encoder_layers, num_decoder_layers=m.num_layers,
        num_heads=m.num_heads, relative_attention_num_buckets=m.relative_buckets,
        relative_attention_max_distance=m.relative_max_distance, layer_norm_epsilon=m.norm_eps,
        feed_forward_proj=_PROJS[m.mlp], tie_word_embeddings=m.tie_embeddings,
        dropout_rate=m.dropout,
    )  # fmt: skip
    common.check_round_trip(m, config_from_hf_t5(out), ARCH_KEYS, "T5")
    return out


def hf_t5_config(cfg: Any, **kwargs: Any) -> Any:
    """The transformers ``T5Config`` for a jaxformer T5 config."""
    import transformers

    return transformers.T5Config(**hf_t5_config_dict(cfg), **kwargs)


def _weights(m: ModelConfig) -> list[hfm.Weight]:
    """T5ForConditionalGeneration's names. ``nn.Linear`` weights, ``[out, in]``, no biases;
    each stack's bias table lives in its first block."""
    gated = m.mlp in ("geglu", "swiglu")
    ups = [("wi_0", "gate"), ("wi_1", "up")] if gated else [("wi", "up")]
    shared = "the shared embedding (shared.weight)"
    out = [
        hfm.weight("shared.weight", ("embed",)),
        # transformers names the shared embedding three more times (the head, if tied).
        hfm.weight("encoder.embed_tokens.weight", ("embed",), alias=True, tied_by=shared),
        hfm.weight("decoder.embed_tokens.weight", ("embed",), alias=True, tied_by=shared),
        hfm.lm_head(m.tie_embeddings, _TIED_HEAD),
    ]
    for stack, layers in (("encoder", m.num_encoder_layers), ("decoder", m.num_layers)):
        table = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out.append(hfm.weight(table, (f"{stack}_relative_bias", "table")))
        out += hfm.norm(f"{stack}.final_layer_norm", (f"{stack}_norm",), bias=False)
        for i in range(layers):
            p, b = f"{stack}.block.{i}.layer.", (stack, i)
            sublayers = [(0, "SelfAttention", "attn")]
            if stack == "decoder":
                sublayers.append((1, "EncDecAttention", "cross"))
            for j, hf, ours in sublayers:
                attn = [f"{p}{j}.{hf}.{n}" for n in "qkvo"]
                out += hfm.attention(attn, (*b, ours), m, bias=False)
                out += hfm.norm(f"{p}{j}.layer_norm", (*b, f"{ours}_norm"), bias=False)
            f = len(sublayers)  # the feed-forward sublayer
            for hf, ours in (*ups, ("wo", "down")):
                mlp = f"{p}{f}.DenseReluDense.{hf}"
                out += hfm.dense(mlp, (*b, "mlp", ours), hfm.TRANSPOSED, None)
            out += hfm.norm(f"{p}{f}.layer_norm", (*b, "mlp_norm"), bias=False)
    return out


def _stacks(m: ModelConfig) -> dict[str, int]:
    return {"encoder": m.num_encoder_layers, "decoder": m.num_layers}


# transformers' decoder cross-attention never has a bias table, old checkpoints do.
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def jax_state_from_hf_t5(state_dict: Mapping[str, Any], cfg: Any) -> dict:
    """A nested pure dict of T5 parameters from a HF state dict; checks names and shapes."""
    return hfm.nest(_params_from_hf(state_dict, common.model_config(cfg)))


def _params_from_hf(state_dict: Mapping[str, Any], m: ModelConfig) -> dict:
    _check_t5(m)
    expected = hfm.expected_params(lambda rngs: T5(m, rngs))
    return hfm.params_from_hf(
        state_dict, _weights(m), expected, model_type="T5", stacks=_stacks(m), ignored=_IGNORED
    )


def import_hf_t5(source: Any, cfg: Any = None, *, seed: int = 0) -> T5:
    """A :class:`T5` holding the weights of a transformers T5 model or state dict.

    ``cfg`` (a full config, its model section or a ModelConfig) defaults to
    ``config_from_hf_t5(source.config)``; a bare state dict needs it. One given must be
    a model T5 can hold and, for a transformers source, the source's (ValueError naming
    ``model.KEY`` otherwise).
    """
    m, state_dict, derived = common.read_source(source, cfg, config_from_hf_t5, "import_hf_t5")
    _check_t5(m)
    if derived is not None:
        common.check_same_model(m, derived, ARCH_KEYS, "Hugging Face model")
    return hfm.build_model(lambda rngs: T5(m, rngs), _params_from_hf(state_dict, m), seed)


def hf_t5_state_dict(model: T5) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names, as numpy arrays (no torch needed)."""
    _check_t5(model.cfg)
    return hfm.params_to_hf(model, _weights(model.cfg), _stacks(model.cfg))


def export_hf_t5(model: T5, cfg: Any = None, *, attn_implementation: str | None = None) -> Any:
    """The model as an eval-mode transformers ``T5ForConditionalGeneration`` (float32).
    ``cfg``, if given, must describe the same model."""
    m = model.cfg
    if cfg is not None:
        common.check_same_model(common.model_config(cfg), m, ARCH_KEYS, "model being exported")
    config = hf_t5_config(m, **common.config_kwargs(attn_implementation))
    import torch
    import transformers

    hf_model = transformers.T5ForConditionalGeneration(config)
    tensors = hfm.to_torch(hf_t5_state_dict(model))
    if not m.tie_embeddings:
        # transformers ties T5's head regardless of the config: untie it, and drop it from
        # the tied keys so save_pretrained writes it.
        hf_model.lm_head.weight = torch.nn.Parameter(tensors["lm_head.weight"].clone())
        tied = getattr(hf_model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop("lm_head.weight", None)
    return hfm.loaded(hf_model, tensors)


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
    return fields, hfm.params_to_hf(model, _weights(m), _stacks(m), aliases=False)


# What load_hf_dir / save_hf_dir / write_hf_dir need of T5.
HF_T5 = HFModelType(
    "t5", T5_SPAN_CORRUPTION, _dir_config, ARCH_KEYS, _dir_import, _dir_export, hf_t5_config_dict
)


__all__ = [
    "ARCH_KEYS",
    "HF_T5",
    "config_from_hf_t5",
    "export_hf_t5",
    "hf_t5_config",
    "hf_t5_config_dict",
    "hf_t5_state_dict",
    "import_hf_t5",
    "jax_state_from_hf_t5",
]
