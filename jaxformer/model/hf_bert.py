"""Hugging Face interop for BERT: weights in and out of :class:`jaxformer.model.bert.Bert`.

Kept apart from :mod:`jaxformer.model.hf` (decoder LMs) but in its style: conversion
goes through numpy, every name and shape is checked, and ``torch``/``transformers`` are
imported only inside the functions that need them.

Supported ``transformers`` sources: ``BertForPreTraining`` (all heads), ``BertForMaskedLM``
(no pooler/NSP), ``BertForSequenceClassification`` (no MLM/NSP), ``BertModel``, or their
state dicts. Heads missing from the source keep a fresh random initialisation (seeded).
Only absolute positions, exact GELU (``hidden_act="gelu"``), encoder-only configs.

Example::

    from transformers import BertForPreTraining
    from jaxformer.model import hf_bert

    torch_model = BertForPreTraining.from_pretrained("bert-base-uncased")
    cfg = hf_bert.config_from_hf_bert(torch_model.config)
    model = hf_bert.import_hf_bert(torch_model, cfg)
    hf_bert.export_hf_bert(model).save_pretrained("out/")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxformer.config import base_config
from jaxformer.model.bert import Bert
from jaxformer.model.decoder import ModelConfig
from jaxformer.model.hf import (
    Path,
    _flatten,
    _get,
    _model_config,
    _name,
    _need,
    _nest,
    _to_numpy,
)

# Keys that change the function a set of BERT weights computes.
_ARCH_KEYS = (
    "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
    "max_len", "type_vocab_size", "position", "norm", "norm_position", "norm_eps", "mlp",
    "use_bias", "scale_embeddings",
)  # fmt: skip

# The Bert config every checkpoint needs, besides the sizes read from the HF config.
_FIXED = {
    "family": "bert",
    "position": "learned",
    "norm": "layernorm",
    "norm_position": "post",
    "mlp": "gelu_exact",
    "use_bias": True,
    "tie_embeddings": True,
    "scale_embeddings": False,
    "scale_attention": True,
    "sliding_window": 0,
    "moe_experts": 0,
}

# HF buffers that hold no parameter, and tied aliases of parameters mapped elsewhere.
_IGNORED = (
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
)


def config_from_hf_bert(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config whose model section reproduces a transformers
    ``BertConfig`` (or its config.json dict); raises ValueError for what Bert cannot do."""
    act = _get(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"BERT hidden_act {act!r} is unsupported: only 'gelu' (exact, erf)")
    pos = _get(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
        raise ValueError(f"BERT position_embedding_type {pos!r} is unsupported (only absolute)")
    if _get(hf_config, "is_decoder", False) or _get(hf_config, "add_cross_attention", False):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is unsupported")
    cfg = base_config()
    m = cfg.model
    m.update(_FIXED)
    m.vocab_size = int(_need(hf_config, "vocab_size"))
    m.d_model = int(_need(hf_config, "hidden_size"))
    m.num_layers = int(_need(hf_config, "num_hidden_layers"))
    m.num_heads = int(_need(hf_config, "num_attention_heads"))
    m.num_kv_heads = 0
    m.head_dim = 0
    m.d_ff = int(_need(hf_config, "intermediate_size"))
    m.max_len = int(_need(hf_config, "max_position_embeddings"))
    m.type_vocab_size = int(_get(hf_config, "type_vocab_size", 2))
    m.norm_eps = float(_get(hf_config, "layer_norm_eps", 1e-12))
    m.dropout = float(_get(hf_config, "hidden_dropout_prob", 0.1) or 0.0)
    m.init_std = float(_get(hf_config, "initializer_range", 0.02))
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def hf_bert_config(cfg: Any, num_labels: int = 2, **kwargs: Any) -> Any:
    """The transformers ``BertConfig`` for a jaxformer Bert config; ``kwargs`` (e.g.
    ``attn_implementation="eager"``) go to the config class."""
    import transformers

    m = _model_config(cfg)
    _check_bert(m)
    fields = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
        max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
        layer_norm_eps=m.norm_eps, hidden_act="gelu", hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=0.0,  # jaxformer has no attention dropout
        initializer_range=m.init_std, num_labels=num_labels, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.BertConfig(**{**fields, **kwargs})


def _check_bert(m: ModelConfig) -> None:
    """Raises unless ``m`` is a model a transformers BERT can hold exactly."""
    want: dict[str, Any] = {k: v for k, v in _FIXED.items() if k != "family"}
    want.update(num_kv_heads=m.num_heads, head_dim=m.d_model // m.num_heads)
    wrong = {k: getattr(m, k) for k, v in want.items() if getattr(m, k) != v}
    if wrong:
        needed = {k: want[k] for k in wrong}
        raise ValueError(
            f"a jaxformer model with {wrong} has no Hugging Face BERT equivalent; "
            f"BERT needs {needed}"
        )


def _check_same_model(have: ModelConfig, want: ModelConfig, what: str) -> None:
    """Eps and the like are not in the weights, so shapes alone cannot tell."""
    wrong = {k: (getattr(have, k), getattr(want, k)) for k in _ARCH_KEYS}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    if wrong:
        detail = ", ".join(f"model.{k}={a!r} ({what}: {b!r})" for k, (a, b) in wrong.items())
        raise ValueError(f"config does not match the {what}: {detail}")


# -- per-name mapping ---------------------------------------------------------------------


def _linear_to_jax(weight: np.ndarray, bias: np.ndarray, split: str | None, m: ModelConfig):
    """nn.Linear [out, in] -> Dense kernel [in, *out]; heads split out of q/k/v and o."""
    h, dh, d = m.num_heads, m.head_dim, m.d_model
    kernel, out_bias = weight.T, bias
    if split == "qkv":
        kernel, out_bias = kernel.reshape(d, h, dh), bias.reshape(h, dh)
    elif split == "o":
        kernel = kernel.reshape(h, dh, d)
    return kernel, out_bias


# (HF module under the layer, jaxformer path under the block, head split)
_LAYER_LINEAR = (
    ("attention.self.query", ("attn", "q"), "qkv"),
    ("attention.self.key", ("attn", "k"), "qkv"),
    ("attention.self.value", ("attn", "v"), "qkv"),
    ("attention.output.dense", ("attn", "o"), "o"),
    ("intermediate.dense", ("mlp", "up"), None),
    ("output.dense", ("mlp", "down"), None),
)
_LAYER_NORMS = (("attention.output.LayerNorm", "attn_norm"), ("output.LayerNorm", "mlp_norm"))
_LINEAR_HEADS = (
    ("bert.pooler.dense", ("pooler",)),
    ("cls.predictions.transform.dense", ("mlm_dense",)),
    ("cls.seq_relationship", ("nsp",)),
    ("classifier", ("classifier",)),
)


def _bert_to_jax(sd: Mapping[str, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """BertForPreTraining-style names -> jaxformer paths, layers stacked on axis 0."""
    e = "bert.embeddings."
    out: dict[Path, np.ndarray] = {
        ("embed",): sd[e + "word_embeddings.weight"],
        ("pos_embed",): sd[e + "position_embeddings.weight"],
        ("type_embed",): sd[e + "token_type_embeddings.weight"],
        ("embed_norm", "scale"): sd[e + "LayerNorm.weight"],
        ("embed_norm", "bias"): sd[e + "LayerNorm.bias"],
    }
    layers: dict[Path, list[np.ndarray]] = {}
    for i in range(m.num_layers):
        p = f"bert.encoder.layer.{i}."
        for name, path, split in _LAYER_LINEAR:
            kernel, bias = _linear_to_jax(
                sd[p + name + ".weight"], sd[p + name + ".bias"], split, m
            )
            layers.setdefault((*path, "kernel"), []).append(kernel)
            layers.setdefault((*path, "bias"), []).append(bias)
        for name, path in _LAYER_NORMS:
            layers.setdefault((path, "scale"), []).append(sd[p + name + ".weight"])
            layers.setdefault((path, "bias"), []).append(sd[p + name + ".bias"])
    out.update({("encoder", *k): np.stack(v) for k, v in layers.items()})
    for name, path in _LINEAR_HEADS:
        if name + ".weight" in sd:
            out[(*path, "kernel")] = sd[name + ".weight"].T
            out[(*path, "bias")] = sd[name + ".bias"]
    if "cls.predictions.bias" in sd:
        t = "cls.predictions.transform.LayerNorm."
        out[("mlm_norm", "scale")] = sd[t + "weight"]
        out[("mlm_norm", "bias")] = sd[t + "bias"]
        out[("mlm_bias",)] = sd["cls.predictions.bias"]
    return out


def _bert_from_jax(w: Mapping[Path, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """jaxformer paths -> HF names (every head the model has); inverse of _bert_to_jax."""
    e = "bert.embeddings."
    out = {
        e + "word_embeddings.weight": w[("embed",)],
        e + "position_embeddings.weight": w[("pos_embed",)],
        e + "token_type_embeddings.weight": w[("type_embed",)],
        e + "LayerNorm.weight": w[("embed_norm", "scale")],
        e + "LayerNorm.bias": w[("embed_norm", "bias")],
    }
    for i in range(m.num_layers):
        p = f"bert.encoder.layer.{i}."
        for name, path, split in _LAYER_LINEAR:
            kernel = w[("encoder", *path, "kernel")][i]
            fan_in = m.num_heads * m.head_dim if split == "o" else kernel.shape[0]
            out[p + name + ".weight"] = kernel.reshape(fan_in, -1).T
            out[p + name + ".bias"] = w[("encoder", *path, "bias")][i].reshape(-1)
        for name, path in _LAYER_NORMS:
            out[p + name + ".weight"] = w[("encoder", path, "scale")][i]
            out[p + name + ".bias"] = w[("encoder", path, "bias")][i]
    for name, path in _LINEAR_HEADS:
        if (*path, "kernel") in w:
            out[name + ".weight"] = w[(*path, "kernel")].T
            out[name + ".bias"] = w[(*path, "bias")]
    t = "cls.predictions.transform.LayerNorm."
    out[t + "weight"] = w[("mlm_norm", "scale")]
    out[t + "bias"] = w[("mlm_norm", "bias")]
    out["cls.predictions.bias"] = w[("mlm_bias",)]
    out["cls.predictions.decoder.weight"] = w[("embed",)]
    out["cls.predictions.decoder.bias"] = w[("mlm_bias",)]
    return out


# -- import / export ------------------------------------------------------------------------


def import_hf_bert(
    source: Any, cfg: Any = None, *, num_labels: int | None = None, seed: int = 0
) -> Bert:
    """A :class:`Bert` holding the weights of a Hugging Face BERT model or state dict.

    ``cfg`` (a full config, its model section or a ModelConfig) defaults to
    ``config_from_hf_bert(source.config)`` and is required for a bare state dict.
    ``num_labels`` defaults to the rows of ``classifier.weight`` (0 without one). Heads
    the source lacks (pooler/NSP of BertForMaskedLM, ...) keep a seeded random init.
    """
    hf_cfg = getattr(source, "config", None)
    if cfg is None:
        if hf_cfg is None:
            raise ValueError("import_hf_bert needs cfg when given a bare state dict")
        cfg = config_from_hf_bert(hf_cfg)
    m = _model_config(cfg)
    _check_bert(m)
    if hf_cfg is not None:
        want = ModelConfig.from_config(config_from_hf_bert(hf_cfg).model)
        _check_same_model(m, want, "Hugging Face model")
    state_dict = source.state_dict() if hasattr(source, "state_dict") else source
    if not any(k.startswith("bert.") for k in state_dict):  # a bare BertModel
        state_dict = {"bert." + k: v for k, v in state_dict.items()}
    if num_labels is None:
        cls_w = state_dict.get("classifier.weight")
        num_labels = 0 if cls_w is None else int(cls_w.shape[0])
    used: set[str] = set()

    class _Tracked(dict):
        def __getitem__(self, key: str) -> np.ndarray:
            if key not in self:
                raise KeyError(f"Hugging Face BERT state dict has no '{key}'")
            used.add(key)
            return _to_numpy(super().__getitem__(key))

    flat = _bert_to_jax(_Tracked(state_dict), m)
    unused = sorted(set(state_dict) - used - set(_IGNORED))
    if unused:
        raise ValueError(f"Hugging Face weights jaxformer has no place for: {unused[:8]}")
    abstract = nnx.eval_shape(lambda: Bert(m, nnx.Rngs(seed), num_labels))
    expected = _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    extra = sorted(map(_name, set(flat) - set(expected)))
    if extra:
        raise ValueError(f"parameter names differ: model lacks {extra}")
    for path, spec in expected.items():
        if path in flat and flat[path].shape != spec.shape:
            raise ValueError(
                f"'{_name(path)}' has shape {flat[path].shape} in the Hugging Face weights but "
                f"{spec.shape} in the jaxformer config (check vocab_size, max_len, heads)"
            )
    missing = set(expected) - set(flat)
    if missing & {("embed",), ("embed_norm", "scale")} or any(p[0] == "encoder" for p in missing):
        raise ValueError(f"Hugging Face weights lack encoder parameters: {sorted(missing)[:8]}")
    model = Bert(m, nnx.Rngs(seed), num_labels) if missing else abstract
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    filled = _flatten(pure)
    for path, value in flat.items():
        filled[path] = jnp.asarray(value.astype(expected[path].dtype, copy=False))
    nnx.replace_by_pure_dict(state, _nest(filled))
    return nnx.merge(graphdef, state)


def hf_bert_state_dict(model: Bert) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face BertForPreTraining names (plus
    ``classifier.*`` when it has one), as numpy arrays."""
    m = model.cfg
    _check_bert(m)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(pure).items()}
    return {k: np.ascontiguousarray(v) for k, v in _bert_from_jax(flat, m).items()}


_HF_CLASSES = {
    "pretraining": "BertForPreTraining",
    "masked_lm": "BertForMaskedLM",
    "sequence_classification": "BertForSequenceClassification",
}


def export_hf_bert(
    model: Bert,
    cfg: Any = None,
    *,
    head: str = "pretraining",
    as_model: bool = True,
    attn_implementation: str | None = None,
) -> Any:
    """The model as a transformers BERT (``head``: pretraining -> BertForPreTraining,
    masked_lm -> BertForMaskedLM, sequence_classification -> BertForSequenceClassification),
    loaded with ``strict=True``, in eval mode; or (``as_model=False``) that class's state
    dict of torch tensors. ``cfg``, if given, must describe the same model."""
    import torch

    m = model.cfg
    if cfg is not None:
        _check_same_model(_model_config(cfg), m, "model being exported")
    if head not in _HF_CLASSES:
        raise ValueError(f"head {head!r}: choose one of {list(_HF_CLASSES)}")
    if head == "sequence_classification" and model.classifier is None:
        raise ValueError("the model has no classifier head (num_labels=0)")
    arrays = hf_bert_state_dict(model)
    keep = {
        "pretraining": lambda k: not k.startswith("classifier."),
        "masked_lm": lambda k: not k.startswith(("classifier.", "bert.pooler.", "cls.seq_")),
        "sequence_classification": lambda k: not k.startswith("cls."),
    }[head]
    tensors = {
        k: torch.from_numpy(np.require(v, np.float32, ["C", "W"]))
        for k, v in arrays.items()
        if keep(k)
    }
    if not as_model:
        return tensors
    import transformers

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = hf_bert_config(m, num_labels=max(model.num_labels, 1), **kwargs)
    hf_model = getattr(transformers, _HF_CLASSES[head])(config)
    hf_model.load_state_dict(tensors, strict=True)
    return hf_model.eval()


__all__ = [
    "config_from_hf_bert",
    "export_hf_bert",
    "hf_bert_config",
    "hf_bert_state_dict",
    "import_hf_bert",
]
