"""Hugging Face interop: GPT-2 and LLaMA weights in and out of :class:`DecoderLM`.

The name mapping lives here, not in the model files (as torchtitan keeps its converters
beside the model), so the model stays free of checkpoint-format details. Conversion goes
through numpy; ``torch`` and ``transformers`` are imported lazily, only inside the
functions that need them, and are never a runtime dependency of training.

Supported ``transformers`` classes:

- ``GPT2LMHeadModel``: learned positions, pre-LN LayerNorm with bias, GELU (tanh,
  ``gelu_new``) or ReLU, biases everywhere, ``c_attn`` packing q, k, v; Conv1D weights are
  stored ``[in, out]``.
- ``LlamaForCausalLM``: RoPE (``rope_type`` default), RMSNorm, SwiGLU, MHA/GQA/MQA,
  optional ``attention_bias`` (only together with ``mlp_bias``: jaxformer has one
  ``use_bias``), tied or untied output; ``nn.Linear`` weights are stored ``[out, in]``.

Example::

    from transformers import GPT2LMHeadModel
    from jaxformer.model import hf

    torch_model = GPT2LMHeadModel.from_pretrained("gpt2")
    cfg = hf.config_from_hf(torch_model.config)    # a full jaxformer config
    model = hf.import_hf(torch_model, cfg)          # a DecoderLM with those weights
    hf.export_hf(model).save_pretrained("out/")     # back to a transformers model
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxformer.config import base_config
from jaxformer.model.decoder import DecoderLM, ModelConfig

FAMILIES = ("gpt2", "llama")
Path = tuple[str | int, ...]

# Model-section keys that change the function a set of weights computes. The others
# (scan_layers, remat, dtype, attention_impl, dropout, init_std) do not, so an imported
# model may set them freely.
_ARCH_KEYS = (
    "family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "d_ff", "max_len", "position", "rope_base", "norm", "norm_position", "norm_eps", "mlp",
    "use_bias", "tie_embeddings", "scale_embeddings", "sliding_window", "moe_experts",
)  # fmt: skip

# Options neither GPT-2 nor LLaMA has, with the value that keeps them out. Read with a
# default, so a key another change has not added to ModelConfig yet counts as off.
_OFF = {
    "family": "decoder",
    "norm_position": "pre",
    "scale_embeddings": False,
    "sliding_window": 0,
    "moe_experts": 0,
}

# Keys of Hugging Face checkpoints that hold no parameter: causal-mask and RoPE buffers
# written by older transformers versions.
_IGNORED_HF_KEYS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


# -- configs ------------------------------------------------------------------------------


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    """Reads a field from a transformers config object or a config.json dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def _need(hf_config: Any, name: str) -> Any:
    """A field the conversion cannot guess."""
    value = _get(hf_config, name)
    if value is None:
        raise ValueError(f"Hugging Face config has no '{name}'")
    return value


def _rope_theta(hf_config: Any) -> float:
    """RoPE base for transformers 4 (``rope_theta``) and 5 (``rope_parameters``); rejects
    scaled variants (llama3, linear, dynamic, yarn) that jaxformer's RoPE does not do."""
    params = _get(hf_config, "rope_parameters") or _get(hf_config, "rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"RoPE scaling '{rope_type}' is not supported: jaxformer's RoPE is plain "
            "(rope_type 'default')"
        )
    theta = params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    return float(theta)


def family_of_hf(hf_config: Any) -> str:
    """'gpt2' or 'llama', from ``model_type`` (or the architecture name)."""
    model_type = _get(hf_config, "model_type", "")
    if model_type in FAMILIES:
        return model_type
    archs = _get(hf_config, "architectures") or []
    for arch, family in (("GPT2", "gpt2"), ("Llama", "llama")):
        if any(a.startswith(arch) for a in archs):
            return family
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: gpt2, llama")


def config_from_hf(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config (``base_config()``) whose model section reproduces
    ``hf_config`` (a transformers ``GPT2Config``/``LlamaConfig`` or its config.json dict).

    Raises ValueError for options jaxformer cannot reproduce exactly, rather than
    importing a model that silently computes something else. ``data.seq_len`` is capped
    at the model's context so the config validates.
    """
    cfg = base_config()
    m = cfg.model
    family = family_of_hf(hf_config)
    if family == "gpt2":
        act = _get(hf_config, "activation_function", "gelu_new")
        acts = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
        if act not in acts:
            raise ValueError(
                f"GPT-2 activation_function {act!r} is not supported: jaxformer's 'gelu' is "
                "the tanh approximation (gelu_new); 'relu' is also available"
            )
        if not _get(hf_config, "scale_attn_weights", True) or _get(
            hf_config, "scale_attn_by_inverse_layer_idx", False
        ):
            raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is unsupported")
        if _get(hf_config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is an encoder-decoder; unsupported")
        d = int(_need(hf_config, "n_embd"))
        m.vocab_size = int(_need(hf_config, "vocab_size"))
        m.d_model = d
        m.num_layers = int(_need(hf_config, "n_layer"))
        m.num_heads = int(_need(hf_config, "n_head"))
        m.num_kv_heads = 0
        m.head_dim = 0
        m.d_ff = int(_get(hf_config, "n_inner") or 4 * d)
        m.max_len = int(_need(hf_config, "n_positions"))
        m.position = "learned"
        m.norm = "layernorm"
        m.norm_eps = float(_get(hf_config, "layer_norm_epsilon", 1e-5))
        m.mlp = acts[act]
        m.use_bias = True
        m.tie_embeddings = bool(_get(hf_config, "tie_word_embeddings", True))
        m.dropout = float(_get(hf_config, "resid_pdrop", 0.0) or 0.0)
    else:
        rope_base = _rope_theta(hf_config)
        act = _get(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"LLaMA hidden_act {act!r} is not supported (only silu: SwiGLU)")
        attention_bias = bool(_get(hf_config, "attention_bias", False))
        mlp_bias = bool(_get(hf_config, "mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError(
                f"LLaMA attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                "supported: jaxformer's model.use_bias covers attention and MLP together"
            )
        heads = int(_need(hf_config, "num_attention_heads"))
        d = int(_need(hf_config, "hidden_size"))
        head_dim = int(_get(hf_config, "head_dim") or d // heads)
        m.vocab_size = int(_need(hf_config, "vocab_size"))
        m.d_model = d
        m.num_layers = int(_need(hf_config, "num_hidden_layers"))
        m.num_heads = heads
        m.num_kv_heads = int(_get(hf_config, "num_key_value_heads") or heads)
        m.head_dim = 0 if head_dim * heads == d else head_dim
        m.d_ff = int(_need(hf_config, "intermediate_size"))
        m.max_len = int(_need(hf_config, "max_position_embeddings"))
        m.position = "rope"
        m.rope_base = rope_base
        m.norm = "rmsnorm"
        m.norm_eps = float(_get(hf_config, "rms_norm_eps", 1e-6))
        m.mlp = "swiglu"
        m.use_bias = attention_bias
        m.tie_embeddings = bool(_get(hf_config, "tie_word_embeddings", False))
        m.dropout = 0.0
    for key, value in _OFF.items():
        if key in m:
            m[key] = value
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def _model_config(cfg: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a full config, or its model section."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if "model" in cfg:
        cfg = cfg["model"]
    return ModelConfig.from_config(cfg)


def family_of(cfg: Any) -> str:
    """The Hugging Face family that can hold a jaxformer model config exactly, or raises
    ValueError naming the options neither GPT-2 nor LLaMA has."""
    m = _model_config(cfg)
    family = "gpt2" if m.position == "learned" else "llama"
    want: dict[str, Any] = dict(_OFF)
    if family == "gpt2":
        want.update(norm="layernorm", use_bias=True, num_kv_heads=m.num_heads)
        want["head_dim"] = m.d_model // m.num_heads
        if m.mlp not in ("gelu", "relu"):
            want["mlp"] = "gelu"
    else:
        want.update(position="rope", norm="rmsnorm", mlp="swiglu")
    wrong = {k: getattr(m, k, v) for k, v in want.items() if getattr(m, k, v) != v}
    if wrong:
        needed = {k: want[k] for k in wrong}
        raise ValueError(
            f"a jaxformer model with {wrong} has no Hugging Face {family} equivalent; "
            f"that family needs {needed}"
        )
    return family


def hf_config_dict(cfg: Any) -> dict[str, Any]:
    """The transformers config (as config.json fields) for a jaxformer model config."""
    m = _model_config(cfg)
    family = family_of(m)
    if family == "gpt2":
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


def hf_config(cfg: Any, **kwargs: Any) -> Any:
    """The transformers ``GPT2Config``/``LlamaConfig`` for a jaxformer model config;
    ``kwargs`` (e.g. ``attn_implementation="eager"``) go to the config class."""
    import transformers

    fields = {**hf_config_dict(cfg), **kwargs}
    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}
    return cls[fields.pop("model_type")](**fields)


# -- weights: per-layer numpy mappings -------------------------------------------------


def _gpt2_to_jax(sd: Mapping[str, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """GPT2LMHeadModel names -> jaxformer paths (blocks indexed by layer)."""
    h, dh, d = m.num_heads, m.head_dim, m.d_model
    out: dict[Path, np.ndarray] = {
        ("embed",): sd["transformer.wte.weight"],
        ("pos_embed",): sd["transformer.wpe.weight"],
        ("final_norm", "scale"): sd["transformer.ln_f.weight"],
        ("final_norm", "bias"): sd["transformer.ln_f.bias"],
    }
    if not m.tie_embeddings:
        out[("lm_head", "kernel")] = sd["lm_head.weight"].T
    for i in range(m.num_layers):
        p = f"transformer.h.{i}."
        q, k, v = np.split(sd[p + "attn.c_attn.weight"], 3, axis=1)  # Conv1D: [in, out]
        qb, kb, vb = np.split(sd[p + "attn.c_attn.bias"], 3)
        layer = {
            ("attn_norm", "scale"): sd[p + "ln_1.weight"],
            ("attn_norm", "bias"): sd[p + "ln_1.bias"],
            ("attn", "q", "kernel"): q.reshape(d, h, dh),
            ("attn", "k", "kernel"): k.reshape(d, h, dh),
            ("attn", "v", "kernel"): v.reshape(d, h, dh),
            ("attn", "q", "bias"): qb.reshape(h, dh),
            ("attn", "k", "bias"): kb.reshape(h, dh),
            ("attn", "v", "bias"): vb.reshape(h, dh),
            ("attn", "o", "kernel"): sd[p + "attn.c_proj.weight"].reshape(h, dh, d),
            ("attn", "o", "bias"): sd[p + "attn.c_proj.bias"],
            ("mlp_norm", "scale"): sd[p + "ln_2.weight"],
            ("mlp_norm", "bias"): sd[p + "ln_2.bias"],
            ("mlp", "up", "kernel"): sd[p + "mlp.c_fc.weight"],
            ("mlp", "up", "bias"): sd[p + "mlp.c_fc.bias"],
            ("mlp", "down", "kernel"): sd[p + "mlp.c_proj.weight"],
            ("mlp", "down", "bias"): sd[p + "mlp.c_proj.bias"],
        }
        out.update({("blocks", i, *key): value for key, value in layer.items()})
    return out


def _gpt2_from_jax(w: Mapping[Path, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """jaxformer paths -> GPT2LMHeadModel names; the inverse of :func:`_gpt2_to_jax`."""
    d = m.d_model
    out = {
        "transformer.wte.weight": w[("embed",)],
        "transformer.wpe.weight": w[("pos_embed",)],
        "transformer.ln_f.weight": w[("final_norm", "scale")],
        "transformer.ln_f.bias": w[("final_norm", "bias")],
        "lm_head.weight": w[("embed",)] if m.tie_embeddings else w[("lm_head", "kernel")].T,
    }
    for i in range(m.num_layers):
        p, b = f"transformer.h.{i}.", ("blocks", i)
        qkv = [w[(*b, "attn", n, "kernel")].reshape(d, d) for n in "qkv"]
        qkv_bias = [w[(*b, "attn", n, "bias")].reshape(d) for n in "qkv"]
        out.update(
            {
                p + "ln_1.weight": w[(*b, "attn_norm", "scale")],
                p + "ln_1.bias": w[(*b, "attn_norm", "bias")],
                p + "attn.c_attn.weight": np.concatenate(qkv, axis=1),
                p + "attn.c_attn.bias": np.concatenate(qkv_bias),
                p + "attn.c_proj.weight": w[(*b, "attn", "o", "kernel")].reshape(d, d),
                p + "attn.c_proj.bias": w[(*b, "attn", "o", "bias")],
                p + "ln_2.weight": w[(*b, "mlp_norm", "scale")],
                p + "ln_2.bias": w[(*b, "mlp_norm", "bias")],
                p + "mlp.c_fc.weight": w[(*b, "mlp", "up", "kernel")],
                p + "mlp.c_fc.bias": w[(*b, "mlp", "up", "bias")],
                p + "mlp.c_proj.weight": w[(*b, "mlp", "down", "kernel")],
                p + "mlp.c_proj.bias": w[(*b, "mlp", "down", "bias")],
            }
        )
    return out


# LLaMA's nn.Linear layers, as (HF module, jaxformer path, heads of the output axis or
# None): HF stores [out, in], jaxformer [in, *out] with heads split out of q, k, v and o.
_LLAMA_LINEAR = (
    ("self_attn.q_proj", ("attn", "q"), "q"),
    ("self_attn.k_proj", ("attn", "k"), "kv"),
    ("self_attn.v_proj", ("attn", "v"), "kv"),
    ("self_attn.o_proj", ("attn", "o"), "o"),
    ("mlp.gate_proj", ("mlp", "gate"), None),
    ("mlp.up_proj", ("mlp", "up"), None),
    ("mlp.down_proj", ("mlp", "down"), None),
)


def _llama_to_jax(sd: Mapping[str, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """LlamaForCausalLM names -> jaxformer paths (blocks indexed by layer)."""
    heads = {"q": m.num_heads, "kv": m.num_kv_heads}
    out: dict[Path, np.ndarray] = {
        ("embed",): sd["model.embed_tokens.weight"],
        ("final_norm", "scale"): sd["model.norm.weight"],
    }
    if not m.tie_embeddings:
        out[("lm_head", "kernel")] = sd["lm_head.weight"].T
    for i in range(m.num_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        out[(*b, "attn_norm", "scale")] = sd[p + "input_layernorm.weight"]
        out[(*b, "mlp_norm", "scale")] = sd[p + "post_attention_layernorm.weight"]
        for name, path, split in _LLAMA_LINEAR:
            kernel = sd[p + name + ".weight"].T  # [in, out]
            if split == "o":
                kernel = kernel.reshape(m.num_heads, m.head_dim, m.d_model)
            elif split is not None:
                kernel = kernel.reshape(m.d_model, heads[split], m.head_dim)
            out[(*b, *path, "kernel")] = kernel
            if m.use_bias:
                bias = sd[p + name + ".bias"]
                if split in heads:
                    bias = bias.reshape(heads[split], m.head_dim)
                out[(*b, *path, "bias")] = bias
    return out


def _llama_from_jax(w: Mapping[Path, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """jaxformer paths -> LlamaForCausalLM names; the inverse of :func:`_llama_to_jax`."""
    out = {
        "model.embed_tokens.weight": w[("embed",)],
        "model.norm.weight": w[("final_norm", "scale")],
        "lm_head.weight": w[("embed",)] if m.tie_embeddings else w[("lm_head", "kernel")].T,
    }
    for i in range(m.num_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        out[p + "input_layernorm.weight"] = w[(*b, "attn_norm", "scale")]
        out[p + "post_attention_layernorm.weight"] = w[(*b, "mlp_norm", "scale")]
        for name, path, split in _LLAMA_LINEAR:
            kernel = w[(*b, *path, "kernel")]
            fan_in = m.num_heads * m.head_dim if split == "o" else kernel.shape[0]
            out[p + name + ".weight"] = kernel.reshape(fan_in, -1).T
            if m.use_bias:
                out[p + name + ".bias"] = w[(*b, *path, "bias")].reshape(-1)
    return out


_TO_JAX = {"gpt2": _gpt2_to_jax, "llama": _llama_to_jax}
_FROM_JAX = {"gpt2": _gpt2_from_jax, "llama": _llama_from_jax}


# -- weights: state plumbing ------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array-like as a numpy array; bf16/fp16
    tensors become float32, since numpy has no bf16 and the target dtype is applied later."""
    if hasattr(value, "detach"):  # a torch tensor; torch is imported only if one is given
        import torch

        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.to(torch.float32)
        return value.numpy()
    return np.asarray(value)


def _stack_layers(flat: dict[Path, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """``('blocks', i, *rest)`` -> ``('blocks', *rest)`` stacked over i (scanned layers)."""
    out = {k: v for k, v in flat.items() if k[0] != "blocks"}
    rests = {k[2:] for k in flat if k[0] == "blocks"}
    for rest in rests:
        out[("blocks", *rest)] = np.stack([flat[("blocks", i, *rest)] for i in range(m.num_layers)])
    return out


def _unstack_layers(flat: dict[Path, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """The inverse of :func:`_stack_layers`."""
    out = {k: v for k, v in flat.items() if k[0] != "blocks"}
    for key, value in flat.items():
        if key[0] == "blocks":
            out.update({("blocks", i, *key[1:]): value[i] for i in range(m.num_layers)})
    return out


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _nest(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def jax_state_from_hf(state_dict: Mapping[str, Any], cfg: Any) -> dict:
    """A nested pure dict of jaxformer parameters (numpy, model dtypes) from a Hugging
    Face state dict: what ``nnx.replace_by_pure_dict`` takes. Checks every name and shape."""
    m = _model_config(cfg)
    family = family_of(m)
    # The bare GPT2Model / LlamaModel name their weights without the LM's prefix.
    prefix = {"gpt2": "transformer.", "llama": "model."}[family]
    if not any(k.startswith(prefix) for k in state_dict):
        state_dict = {prefix + k: v for k, v in state_dict.items()}
    used: set[str] = set()

    class _Tracked(dict):
        def __getitem__(self, key: str) -> np.ndarray:
            if key not in self:
                raise KeyError(f"Hugging Face {family} state dict has no '{key}'")
            used.add(key)
            return _to_numpy(super().__getitem__(key))

    flat = _TO_JAX[family](_Tracked(state_dict), m)
    ignorable = {k for k in state_dict if _IGNORED_HF_KEYS.match(k)}
    if m.tie_embeddings:
        ignorable.add("lm_head.weight")  # a second name for the embedding
    unused = sorted(set(state_dict) - used - ignorable)
    if unused:
        raise ValueError(f"Hugging Face weights jaxformer has no place for: {unused[:8]}")
    if m.scan_layers:
        flat = _stack_layers(flat, m)
    abstract = nnx.eval_shape(lambda: DecoderLM(m, nnx.Rngs(0)))
    expected = _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    if set(expected) != set(flat):
        missing = sorted(map(_name, set(expected) - set(flat)))
        extra = sorted(map(_name, set(flat) - set(expected)))
        raise ValueError(f"parameter names differ: model lacks {extra}, mapping lacks {missing}")
    for path, spec in expected.items():
        if flat[path].shape != spec.shape:
            raise ValueError(
                f"'{_name(path)}' has shape {flat[path].shape} in the Hugging Face weights but "
                f"{spec.shape} in the jaxformer config (check vocab_size, max_len, heads)"
            )
        flat[path] = flat[path].astype(spec.dtype, copy=False)
    return _nest(flat)


def _check_same_model(have: ModelConfig, want: ModelConfig, what: str) -> None:
    """Raises if ``have`` computes something else than ``want``: eps, RoPE base and the
    like are not in the weights, so shapes alone cannot tell."""
    wrong = {
        k: (getattr(have, k, _OFF.get(k)), getattr(want, k, _OFF.get(k)))
        for k in _ARCH_KEYS
        if getattr(have, k, _OFF.get(k)) != getattr(want, k, _OFF.get(k))
    }
    if wrong:
        detail = ", ".join(f"model.{k}={a!r} ({what}: {b!r})" for k, (a, b) in wrong.items())
        raise ValueError(f"config does not match the {what}: {detail}")


def import_hf(source: Any, cfg: Any = None, *, seed: int = 0) -> DecoderLM:
    """A :class:`DecoderLM` holding the weights of a Hugging Face GPT-2 or LLaMA model.

    ``source`` is a transformers model (its config is checked against ``cfg``) or a state
    dict of torch tensors or numpy arrays (then ``cfg`` is required). ``cfg`` is a full
    jaxformer config, its model section or a ModelConfig; by default
    ``config_from_hf(source.config)``. Non-architectural keys (scan_layers, dtype,
    param_dtype, attention_impl, remat, dropout) are taken from ``cfg`` as given.
    No random initialisation is run: the model is built from ``eval_shape`` and filled.
    """
    hf_cfg = getattr(source, "config", None)
    if cfg is None:
        if hf_cfg is None:
            raise ValueError("import_hf needs cfg when given a bare state dict")
        cfg = config_from_hf(hf_cfg)
    m = _model_config(cfg)
    if hf_cfg is not None:
        want = ModelConfig.from_config(config_from_hf(hf_cfg).model)
        _check_same_model(m, want, "Hugging Face model")
    state_dict = source.state_dict() if hasattr(source, "state_dict") else source
    pure = jax_state_from_hf(state_dict, m)
    abstract = nnx.eval_shape(lambda: DecoderLM(m, nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def _export_config(model: DecoderLM, cfg: Any) -> ModelConfig:
    """The model's own config; a ``cfg`` given too must describe the same model."""
    if cfg is not None:
        _check_same_model(_model_config(cfg), model.cfg, "model being exported")
    return model.cfg


def hf_state_dict(model: DecoderLM, cfg: Any = None) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names, as numpy arrays (no torch needed)."""
    m = _export_config(model, cfg)
    family = family_of(m)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(pure).items()}
    if m.scan_layers:
        flat = _unstack_layers(flat, m)
    return {k: np.ascontiguousarray(v) for k, v in _FROM_JAX[family](flat, m).items()}


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

    The transformers model is in eval mode; ``save_pretrained(dir)`` writes a directory
    that ``AutoModelForCausalLM.from_pretrained(dir)`` reloads. ``dtype`` (a torch dtype)
    casts the weights; by default they stay float32. ``attn_implementation`` ("eager",
    "sdpa") is passed to the transformers config.
    """
    import torch

    m = _export_config(model, cfg)
    tensors = {
        # Writable float32 copies only where needed: jax hands out read-only buffers.
        k: torch.from_numpy(np.require(v, np.float32, ["C", "W"]))
        for k, v in hf_state_dict(model, m).items()
    }
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if not as_model:
        return tensors
    import transformers

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = hf_config(m, **kwargs)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
    hf_model = cls[config.model_type](config)
    if dtype is not None:
        hf_model = hf_model.to(dtype)
    if m.tie_embeddings and "lm_head.weight" not in hf_model.state_dict():
        tensors.pop("lm_head.weight")
    hf_model.load_state_dict(tensors, strict=True)
    return hf_model.eval()


__all__ = [
    "config_from_hf",
    "export_hf",
    "family_of",
    "family_of_hf",
    "hf_config",
    "hf_config_dict",
    "hf_state_dict",
    "import_hf",
    "jax_state_from_hf",
]
