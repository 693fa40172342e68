"""GPT-2 and LLaMA weights in and out of :class:`~jaxformer.model.DecoderLM`.

The config translation (checked both ways, :mod:`jaxformer.hf.common`) and one
name/shape map per model type; the map's walk is :mod:`jaxformer.hf.mapping`'s. ``torch``
and ``transformers`` are imported lazily, only inside the functions that need them.

Supported ``transformers`` classes:

- ``GPT2LMHeadModel``: learned positions, pre-LN LayerNorm with bias, GELU (tanh,
  ``gelu_new``) or ReLU, biases everywhere, ``c_attn`` packing q, k, v (Conv1D weights
  are stored ``[in, out]``); ``scale_attn_weights=False`` is ``model.scale_attention=False``.
- ``LlamaForCausalLM``: RoPE (``rope_type`` default), RMSNorm, SwiGLU, MHA/GQA/MQA,
  optional ``attention_bias`` (only together with ``mlp_bias``: jaxformer has one
  ``use_bias``), tied or untied output; ``nn.Linear`` weights are stored ``[out, in]``.

Example::

    from transformers import GPT2LMHeadModel
    from jaxformer import hf

    torch_model = GPT2LMHeadModel.from_pretrained("gpt2")
    cfg = hf.config_from_hf(torch_model.config)    # a full jaxformer config
    model = hf.import_hf(torch_model, cfg)          # a DecoderLM with those weights
    hf.export_hf(model).save_pretrained("out/")     # back to a transformers model
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxformer.config import base_config
from jaxformer.hf import common
from jaxformer.hf import mapping as hfm
from jaxformer.hf.model_type import HFModelType
from jaxformer.model import DecoderLM, ModelConfig
from jaxformer.tasks.decoder_lm import DECODER_LM

MODEL_TYPE_NAMES = ("gpt2", "llama")

# Model-section keys that change the function a set of GPT-2 weights computes. The
# others (scan_layers, remat, dtype, the attention kernel, dropout, init_std) do not, so
# an imported model may set them freely; rope_base, the moe_* sizes, T5's and BERT's keys
# do not apply to a GPT-2.
_GPT2_KEYS = (
    "family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "d_ff", "max_len", "position", "norm", "norm_position", "norm_eps", "mlp", "use_bias",
    "tie_embeddings", "scale_embeddings", "scale_attention", "sliding_window", "moe_experts",
)  # fmt: skip
_LLAMA_KEYS = (*_GPT2_KEYS, "rope_base")
ARCH_KEYS = {"gpt2": _GPT2_KEYS, "llama": _LLAMA_KEYS}

# Options neither GPT-2 nor LLaMA has, with the value that keeps them out. Read with a
# default, so a key another change has not added to ModelConfig yet counts as off.
_OFF = {
    "family": DECODER_LM.name,
    "norm_position": "pre",
    "scale_embeddings": False,
    "sliding_window": 0,
    "moe_experts": 0,
}

# Keys of Hugging Face checkpoints that hold no parameter: causal-mask and RoPE buffers
# written by older transformers versions.
_IGNORED_HF_KEYS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")

_GPT2_ACTS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


# -- configs ------------------------------------------------------------------------------


def _rope_theta(hf_config: Any) -> float:
    """RoPE base for transformers 4 (``rope_theta``) and 5 (``rope_parameters``); rejects
    scaled variants (llama3, linear, dynamic, yarn) that jaxformer's RoPE does not do."""
    params = common.get(hf_config, "rope_parameters") or common.get(hf_config, "rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"RoPE scaling '{rope_type}' is not supported: jaxformer's RoPE is plain "
            "(rope_type 'default'; Hugging Face rope_scaling / rope_parameters)"
        )
    theta = params.get("rope_theta", common.get(hf_config, "rope_theta", 10000.0))
    return float(theta)


def model_type_of_hf(hf_config: Any) -> str:
    """'gpt2' or 'llama', from ``model_type`` (or the architecture name)."""
    model_type = common.get(hf_config, "model_type", "")
    if model_type in MODEL_TYPE_NAMES:
        return model_type
    archs = common.get(hf_config, "architectures") or []
    for arch, name in (("GPT2", "gpt2"), ("Llama", "llama")):
        if any(a.startswith(arch) for a in archs):
            return name
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: gpt2, llama")


def _gpt2_config(hf_config: Any, m: ml_collections.ConfigDict) -> None:
    act = common.get(hf_config, "activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise ValueError(
            f"GPT-2 activation_function {act!r} is not supported: jaxformer's 'gelu' is "
            "the tanh approximation (gelu_new); 'relu' is also available"
        )
    if common.get(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "GPT-2 scale_attn_by_inverse_layer_idx=True (logits divided by the layer "
            "number) is unsupported: model.scale_attention only divides by sqrt(head_dim)"
        )
    if common.get(hf_config, "add_cross_attention", False):
        raise ValueError("GPT-2 add_cross_attention=True is an encoder-decoder; unsupported")
    d = int(common.need(hf_config, "n_embd"))
    m.vocab_size = int(common.need(hf_config, "vocab_size"))
    m.d_model = d
    m.num_layers = int(common.need(hf_config, "n_layer"))
    m.num_heads = int(common.need(hf_config, "n_head"))
    m.num_kv_heads = 0
    m.head_dim = 0
    m.d_ff = int(common.get(hf_config, "n_inner") or 4 * d)
    m.max_len = int(common.need(hf_config, "n_positions"))
    m.position = "learned"
    m.norm = "layernorm"
    m.norm_eps = float(common.get(hf_config, "layer_norm_epsilon", 1e-5))
    m.mlp = _GPT2_ACTS[act]
    m.use_bias = True
    m.tie_embeddings = bool(common.get(hf_config, "tie_word_embeddings", True))
    # reorder_and_upcast_attn only changes the precision of the same product.
    m.scale_attention = bool(common.get(hf_config, "scale_attn_weights", True))
    m.dropout = float(common.get(hf_config, "resid_pdrop", 0.0) or 0.0)


def _llama_config(hf_config: Any, m: ml_collections.ConfigDict) -> None:
    rope_base = _rope_theta(hf_config)
    act = common.get(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"LLaMA hidden_act {act!r} is not supported (only silu: SwiGLU)")
    attention_bias = bool(common.get(hf_config, "attention_bias", False))
    mlp_bias = bool(common.get(hf_config, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"LLaMA attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
            "supported: jaxformer's model.use_bias covers attention and MLP together"
        )
    heads = int(common.need(hf_config, "num_attention_heads"))
    d = int(common.need(hf_config, "hidden_size"))
    head_dim = int(common.get(hf_config, "head_dim") or d // heads)
    m.vocab_size = int(common.need(hf_config, "vocab_size"))
    m.d_model = d
    m.num_layers = int(common.need(hf_config, "num_hidden_layers"))
    m.num_heads = heads
    m.num_kv_heads = int(common.get(hf_config, "num_key_value_heads") or heads)
    m.head_dim = 0 if head_dim * heads == d else head_dim
    m.d_ff = int(common.need(hf_config, "intermediate_size"))
    m.max_len = int(common.need(hf_config, "max_position_embeddings"))
    m.position = "rope"
    m.rope_base = rope_base
    m.norm = "rmsnorm"
    m.norm_eps = float(common.get(hf_config, "rms_norm_eps", 1e-6))
    m.mlp = "swiglu"
    m.use_bias = attention_bias
    m.tie_embeddings = bool(common.get(hf_config, "tie_word_embeddings", False))
    m.scale_attention = True  # LLaMA always divides by sqrt(head_dim)
    m.dropout = 0.0


def config_from_hf(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config (``base_config()``) whose model section reproduces
    ``hf_config`` (a transformers ``GPT2Config``/``LlamaConfig`` or its config.json dict).

    Raises ValueError, naming the Hugging Face field, for options jaxformer cannot
    reproduce exactly, rather than importing a model that silently computes something
    else. ``data.seq_len`` is capped at the model's context so the config validates.
    """
    cfg = base_config()
    m = cfg.model
    if model_type_of_hf(hf_config) == "gpt2":
        _gpt2_config(hf_config, m)
    else:
        _llama_config(hf_config, m)
    for key, value in _OFF.items():
        if key in m:
            m[key] = value
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def model_type_of(cfg: Any) -> str:
    """The Hugging Face model type ('gpt2' or 'llama') that can hold a jaxformer model
    config exactly, or raises ValueError naming the options (``model.KEY``) neither GPT-2
    nor LLaMA has."""
    m = common.model_config(cfg)
    model_type = "gpt2" if m.position == "learned" else "llama"
    want: dict[str, Any] = dict(_OFF)
    if model_type == "gpt2":
        want.update(norm="layernorm", use_bias=True, num_kv_heads=m.num_heads)
        want["head_dim"] = m.d_model // m.num_heads
        if m.mlp not in ("gelu", "relu"):
            want["mlp"] = "gelu"
    else:
        want.update(position="rope", norm="rmsnorm", mlp="swiglu", scale_attention=True)
    common.check_supported(m, want, model_type)
    return model_type


def _hf_fields(m: ModelConfig, model_type: str) -> dict[str, Any]:
    if model_type == "gpt2":
        out: dict[str, Any] = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": m.vocab_size,
            "n_embd": m.d_model,
            "n_layer": m.num_layers,
            "n_head": m.num_heads,
            "n_inner": m.d_ff,
            "n_positions": m.max_len,
            "activation_function": "gelu_new" if m.mlp == "gelu" else "relu",
            "layer_norm_epsilon": m.norm_eps,
            "scale_attn_weights": m.scale_attention,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": 0.0,  # jaxformer has no dropout on attention probabilities
            "tie_word_embeddings": m.tie_embeddings,
        }
        if m.vocab_size <= 50256:  # GPT-2's <|endoftext|> id would be out of range
            out.update(bos_token_id=None, eos_token_id=None)
        return out
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.max_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "hidden_act": "silu",
        "attention_bias": m.use_bias,
        "mlp_bias": m.use_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
    }


def hf_config_dict(cfg: Any) -> dict[str, Any]:
    """The transformers config (as config.json fields) for a jaxformer model config;
    raises ValueError naming each ``model.KEY`` the config could not carry."""
    m = common.model_config(cfg)
    model_type = model_type_of(m)
    out = _hf_fields(m, model_type)
    common.check_round_trip(m, config_from_hf(out), ARCH_KEYS[model_type], model_type, _OFF)
    return out


def hf_config(cfg: Any, **kwargs: Any) -> Any:
    """The transformers ``GPT2Config``/``LlamaConfig`` for a jaxformer model config;
    ``kwargs`` (e.g. ``attn_implementation="eager"``) go to the config class."""
    import transformers

    fields = {**hf_config_dict(cfg), **kwargs}
    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}
    return cls[fields.pop("model_type")](**fields)


# -- weights: the name/shape maps --------------------------------------------------------


def _gpt2_weights(m: ModelConfig) -> list[hfm.Weight]:
    """GPT2LMHeadModel. Conv1D weights are stored ``[in, out]``; ``c_attn`` packs q, k, v
    on its last axis."""
    h, dh, d = m.num_heads, m.head_dim, m.d_model
    out = [
        hfm.weight("transformer.wte.weight", ("embed",)),
        hfm.weight("transformer.wpe.weight", ("pos_embed",)),
        *hfm.norm("transformer.ln_f", ("final_norm",), bias=True),
        hfm.lm_head(m.tie_embeddings),
    ]
    conv1d = functools.partial(hfm.kernel, transposed=False)
    for i in range(m.num_layers):
        p, b = f"transformer.h.{i}.", ("blocks", i)
        q_k_v = [(*b, "attn", n) for n in "qkv"]
        out += hfm.norm(p + "ln_1", (*b, "attn_norm"), bias=True)
        out += hfm.packed(p + "attn.c_attn", q_k_v, conv1d((d,), (h, dh)), hfm.reshaped(h, dh))
        out += hfm.dense(p + "attn.c_proj", (*b, "attn", "o"), conv1d((h, dh), (d,)), hfm.SAME)
        out += hfm.norm(p + "ln_2", (*b, "mlp_norm"), bias=True)
        out += hfm.dense(p + "mlp.c_fc", (*b, "mlp", "up"), hfm.SAME, hfm.SAME)
        out += hfm.dense(p + "mlp.c_proj", (*b, "mlp", "down"), hfm.SAME, hfm.SAME)
    return out


def _llama_weights(m: ModelConfig) -> list[hfm.Weight]:
    """LlamaForCausalLM. ``nn.Linear`` weights are stored ``[out, in]``."""
    bias = hfm.SAME if m.use_bias else None
    out = [
        hfm.weight("model.embed_tokens.weight", ("embed",)),
        *hfm.norm("model.norm", ("final_norm",), bias=False),
        hfm.lm_head(m.tie_embeddings),
    ]
    for i in range(m.num_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        out += hfm.norm(p + "input_layernorm", (*b, "attn_norm"), bias=False)
        out += hfm.norm(p + "post_attention_layernorm", (*b, "mlp_norm"), bias=False)
        attn = [f"{p}self_attn.{n}_proj" for n in "qkvo"]
        out += hfm.attention(attn, (*b, "attn"), m, bias=m.use_bias)
        for n in ("gate", "up", "down"):
            out += hfm.dense(f"{p}mlp.{n}_proj", (*b, "mlp", n), hfm.TRANSPOSED, bias)
    return out


def _weights(m: ModelConfig) -> list[hfm.Weight]:
    """The map of the model type that holds ``m`` (raises if none does)."""
    return {"gpt2": _gpt2_weights, "llama": _llama_weights}[model_type_of(m)](m)


def _stacks(m: ModelConfig) -> dict[str, int]:
    return {"blocks": m.num_layers} if m.scan_layers else {}


# -- import and export --------------------------------------------------------------------


def _params_from_hf(state_dict: Mapping[str, Any], m: ModelConfig) -> dict:
    model_type = model_type_of(m)
    # The bare GPT2Model / LlamaModel name their weights without the LM's prefix.
    prefix = {"gpt2": "transformer.", "llama": "model."}[model_type]
    state_dict = common.with_prefix(state_dict, prefix)
    return hfm.params_from_hf(
        state_dict,
        _weights(m),
        hfm.expected_params(lambda rngs: DecoderLM(m, rngs)),
        model_type=model_type,
        stacks=_stacks(m),
        ignored=[k for k in state_dict if _IGNORED_HF_KEYS.match(k)],
    )


def jax_state_from_hf(state_dict: Mapping[str, Any], cfg: Any) -> dict:
    """A nested pure dict of jaxformer parameters (numpy, model dtypes) from a Hugging
    Face state dict: what ``nnx.replace_by_pure_dict`` takes. Checks every name and shape."""
    return hfm.nest(_params_from_hf(state_dict, common.model_config(cfg)))


def import_hf(source: Any, cfg: Any = None, *, seed: int = 0) -> DecoderLM:
    """A :class:`DecoderLM` holding the weights of a Hugging Face GPT-2 or LLaMA model.

    ``source`` is a transformers model (its config is checked against ``cfg``) or a state
    dict of torch tensors or numpy arrays (then ``cfg`` is required, and must be a model
    GPT-2 or LLaMA can hold). ``cfg`` is a full jaxformer config, its model section or a
    ModelConfig; by default ``config_from_hf(source.config)``. Keys that do not change
    what the weights compute (scan_layers, dtype, param_dtype, the attention kernel,
    remat, dropout) are taken from ``cfg`` as given. No random initialisation is run: the
    model is built from ``eval_shape`` and filled.
    """
    m, state_dict, derived = common.read_source(source, cfg, config_from_hf, "import_hf")
    if derived is not None:
        keys = ARCH_KEYS[model_type_of_hf(source.config)]
        common.check_same_model(m, derived, keys, "Hugging Face model", _OFF)
    params = _params_from_hf(state_dict, m)
    return hfm.build_model(lambda rngs: DecoderLM(m, rngs), params, seed)


def _export_config(model: DecoderLM, cfg: Any) -> ModelConfig:
    """The model's own config (one GPT-2 or LLaMA can hold); a ``cfg`` given too must
    describe the same model."""
    m = model.cfg
    model_type = model_type_of(m)
    if cfg is not None:
        have = common.model_config(cfg)
        common.check_same_model(have, m, ARCH_KEYS[model_type], "model being exported", _OFF)
    return m


def hf_state_dict(model: DecoderLM, cfg: Any = None) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names, as numpy arrays (no torch needed)."""
    m = _export_config(model, cfg)
    return hfm.params_to_hf(model, _weights(m), _stacks(m))


def export_hf(
    model: DecoderLM,
    cfg: Any = None,
    *,
    as_model: bool = True,
    dtype: Any = None,
    attn_implementation: str | None = None,
) -> Any:
    """The model as a transformers ``GPT2LMHeadModel``/``LlamaForCausalLM`` (``as_model``),
    or as a state dict of torch tensors for ``load_state_dict`` / safetensors.

    Refuses (ValueError naming ``model.KEY``) a model neither GPT-2 nor LLaMA computes
    exactly.
    The transformers model is in eval mode; ``save_pretrained(dir)`` writes a directory
    that ``AutoModelForCausalLM.from_pretrained(dir)`` reloads. ``dtype`` (a torch dtype)
    casts the weights; by default they stay float32. ``attn_implementation`` ("eager",
    "sdpa") is passed to the transformers config.
    """
    m = _export_config(model, cfg)
    tensors = hfm.to_torch(hf_state_dict(model, m), dtype)
    if not as_model:
        return tensors
    import transformers

    config = hf_config(m, **common.config_kwargs(attn_implementation))
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
    hf_model = cls[config.model_type](config)
    if dtype is not None:
        hf_model = hf_model.to(dtype)
    if m.tie_embeddings and "lm_head.weight" not in hf_model.state_dict():
        tensors.pop("lm_head.weight")
    return hfm.loaded(hf_model, tensors)


# -- checkpoint directories ---------------------------------------------------------------


def _dir_config(hf_config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """config.json says all a GPT-2 or LLaMA model needs: the shapes add nothing."""
    del shapes
    return config_from_hf(hf_config)


def _dir_import(state_dict: Mapping[str, Any], cfg: Any, seed: int) -> DecoderLM:
    return import_hf(state_dict, cfg, seed=seed)


def _dir_export(model: DecoderLM) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    m = model.cfg
    fields = hf_config_dict(m)
    return fields, hfm.params_to_hf(model, _weights(m), _stacks(m), aliases=False)


# What load_hf_dir / save_hf_dir / write_hf_dir need of GPT-2 and LLaMA.
HF_GPT2, HF_LLAMA = (
    HFModelType(
        name,
        DECODER_LM,
        _dir_config,
        ARCH_KEYS[name],
        _dir_import,
        _dir_export,
        hf_config_dict,
        _OFF,
    )  # fmt: skip
    for name in MODEL_TYPE_NAMES
)


__all__ = [
    "ARCH_KEYS",
    "HF_GPT2",
    "HF_LLAMA",
    "MODEL_TYPE_NAMES",
    "config_from_hf",
    "export_hf",
    "hf_config",
    "hf_config_dict",
    "hf_state_dict",
    "import_hf",
    "jax_state_from_hf",
    "model_type_of",
    "model_type_of_hf",
]
