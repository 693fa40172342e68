"""Hugging Face interop for BERT: weights in and out of :class:`jaxformer.model.bert.Bert`.

The config translation and the name/shape map; the conversion itself (through numpy,
every name and shape checked) is :mod:`jaxformer.model.hf_common`'s, and
``torch``/``transformers`` are imported only inside the functions that need them.

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

import ml_collections
import numpy as np

from jaxformer.config import base_config
from jaxformer.model import hf_common as hfc
from jaxformer.model.bert import Bert
from jaxformer.model.decoder import ModelConfig

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

# HF buffers that hold no parameter.
_IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def config_from_hf_bert(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config whose model section reproduces a transformers
    ``BertConfig`` (or its config.json dict); raises ValueError for what Bert cannot do."""
    act = hfc.get(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"BERT hidden_act {act!r} is unsupported: only 'gelu' (exact, erf)")
    pos = hfc.get(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
        raise ValueError(f"BERT position_embedding_type {pos!r} is unsupported (only absolute)")
    if hfc.get(hf_config, "is_decoder", False) or hfc.get(hf_config, "add_cross_attention", False):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is unsupported")
    cfg = base_config()
    m = cfg.model
    m.update(_FIXED)
    m.vocab_size = int(hfc.need(hf_config, "vocab_size"))
    m.d_model = int(hfc.need(hf_config, "hidden_size"))
    m.num_layers = int(hfc.need(hf_config, "num_hidden_layers"))
    m.num_heads = int(hfc.need(hf_config, "num_attention_heads"))
    m.num_kv_heads = 0
    m.head_dim = 0
    m.d_ff = int(hfc.need(hf_config, "intermediate_size"))
    m.max_len = int(hfc.need(hf_config, "max_position_embeddings"))
    m.type_vocab_size = int(hfc.get(hf_config, "type_vocab_size", 2))
    m.norm_eps = float(hfc.get(hf_config, "layer_norm_eps", 1e-12))
    m.dropout = float(hfc.get(hf_config, "hidden_dropout_prob", 0.1) or 0.0)
    m.init_std = float(hfc.get(hf_config, "initializer_range", 0.02))
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def hf_bert_config_dict(cfg: Any, num_labels: int = 2) -> dict[str, Any]:
    """The ``BertConfig`` fields (config.json, without ``model_type``) of a jaxformer
    Bert config."""
    m = hfc.model_config(cfg)
    _check_bert(m)
    return dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
        max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
        layer_norm_eps=m.norm_eps, hidden_act="gelu", hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=0.0,  # jaxformer has no attention dropout
        initializer_range=m.init_std, num_labels=num_labels, tie_word_embeddings=True,
    )  # fmt: skip


def hf_bert_config(cfg: Any, num_labels: int = 2, **kwargs: Any) -> Any:
    """The transformers ``BertConfig`` for a jaxformer Bert config; ``kwargs`` (e.g.
    ``attn_implementation="eager"``) go to the config class."""
    import transformers

    return transformers.BertConfig(**{**hf_bert_config_dict(cfg, num_labels), **kwargs})


def _check_bert(m: ModelConfig) -> None:
    """Raises unless ``m`` is a model a transformers BERT can hold exactly."""
    want: dict[str, Any] = {k: v for k, v in _FIXED.items() if k != "family"}
    want.update(num_kv_heads=m.num_heads, head_dim=m.d_model // m.num_heads)
    hfc.check_equivalent(m, want, "BERT")


# -- the name/shape map ------------------------------------------------------------------

# A layer's attention: q, k, v, o.
_ATTENTION = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)
# Heads a source may lack (a bare BertModel has none, BertForMaskedLM no pooler or NSP):
# (HF module, jaxformer path, head).
_HEADS = (
    ("bert.pooler.dense", ("pooler",), "pooler"),
    ("cls.predictions.transform.dense", ("mlm_dense",), "mlm"),
    ("cls.seq_relationship", ("nsp",), "nsp"),
    ("classifier", ("classifier",), "classifier"),
)


def _weights(m: ModelConfig, num_labels: int) -> list[hfc.Weight]:
    """BertForPreTraining's names (plus ``classifier.*`` with ``num_labels``)."""
    e = "bert.embeddings."
    out = [
        hfc.weight(e + "word_embeddings.weight", ("embed",)),
        hfc.weight(e + "position_embeddings.weight", ("pos_embed",)),
        hfc.weight(e + "token_type_embeddings.weight", ("type_embed",)),
        *hfc.norm(e + "LayerNorm", ("embed_norm",), bias=True),
    ]
    for i in range(m.num_layers):
        p, b = f"bert.encoder.layer.{i}.", ("encoder", i)
        out += hfc.attention([p + n for n in _ATTENTION], (*b, "attn"), m, bias=True)
        out += hfc.norm(p + "attention.output.LayerNorm", (*b, "attn_norm"), bias=True)
        out += hfc.dense(p + "intermediate.dense", (*b, "mlp", "up"), hfc.TRANSPOSED, hfc.SAME)
        out += hfc.dense(p + "output.dense", (*b, "mlp", "down"), hfc.TRANSPOSED, hfc.SAME)
        out += hfc.norm(p + "output.LayerNorm", (*b, "mlp_norm"), bias=True)
    for name, path, head in _HEADS:
        if head != "classifier" or num_labels > 0:
            out += hfc.dense(name, path, hfc.TRANSPOSED, hfc.SAME, head=head)
    return [
        *out,
        *hfc.norm("cls.predictions.transform.LayerNorm", ("mlm_norm",), bias=True, head="mlm"),
        hfc.weight("cls.predictions.bias", ("mlm_bias",), head="mlm"),
        # The MLM decoder: the word embeddings and the MLM bias again.
        hfc.weight("cls.predictions.decoder.weight", ("embed",), alias=True),
        hfc.weight("cls.predictions.decoder.bias", ("mlm_bias",), alias=True),
    ]


def _stacks(m: ModelConfig) -> dict[str, int]:
    return {"encoder": m.num_layers}


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
    m, state_dict, hf_cfg = hfc.read_source(source, cfg, config_from_hf_bert, "import_hf_bert")
    _check_bert(m)
    if hf_cfg is not None:
        want = ModelConfig.from_config(config_from_hf_bert(hf_cfg).model)
        hfc.check_same_model(m, want, _ARCH_KEYS, "Hugging Face model")
    state_dict = hfc.with_prefix(state_dict, "bert.")  # a bare BertModel has no "bert."
    if num_labels is None:
        cls_w = state_dict.get("classifier.weight")
        num_labels = 0 if cls_w is None else int(cls_w.shape[0])

    def make(rngs: Any) -> Bert:
        return Bert(m, rngs, num_labels)

    params = hfc.params_from_hf(
        state_dict,
        _weights(m, num_labels),
        hfc.expected_params(make),
        family="BERT",
        stacks=_stacks(m),
        ignored=_IGNORED,
    )
    return hfc.build_model(make, params, seed)


def hf_bert_state_dict(model: Bert) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face BertForPreTraining names (plus
    ``classifier.*`` when it has one), as numpy arrays."""
    m = model.cfg
    _check_bert(m)
    return hfc.params_to_hf(model, _weights(m, model.num_labels), _stacks(m))


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
    m = model.cfg
    if cfg is not None:
        hfc.check_same_model(hfc.model_config(cfg), m, _ARCH_KEYS, "model being exported")
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
    tensors = hfc.to_torch({k: v for k, v in arrays.items() if keep(k)})
    if not as_model:
        return tensors
    import transformers

    kwargs = hfc.config_kwargs(attn_implementation)
    config = hf_bert_config(m, num_labels=max(model.num_labels, 1), **kwargs)
    hf_model = getattr(transformers, _HF_CLASSES[head])(config)
    return hfc.loaded(hf_model, tensors)


# -- checkpoint directories ---------------------------------------------------------------


def _dir_config(hf_config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """config.json's model, with ``num_labels`` from the classifier the files hold (0
    without one): config.json always lists labels, whatever the head."""
    cfg = config_from_hf_bert(hf_config)
    classifier = shapes.get("classifier.weight")
    cfg.model.num_labels = 0 if classifier is None else int(classifier[0])
    return cfg


def _dir_import(state_dict: Mapping[str, Any], cfg: Any, seed: int) -> Bert:
    labels = cfg.get("model", cfg).get("num_labels") if hasattr(cfg, "get") else None
    return import_hf_bert(state_dict, cfg, num_labels=labels, seed=seed)


def _dir_export(model: Bert) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """BertForPreTraining's tensors (the classifier's too, if the model has one), under
    the class of its head: ``AutoModelForMaskedLM`` and the others load what they use."""
    m = model.cfg
    _check_bert(m)
    arch = "BertForSequenceClassification" if model.num_labels else "BertForPreTraining"
    fields = hf_bert_config_dict(m, num_labels=model.num_labels or 2)
    fields.update(model_type="bert", architectures=[arch])
    return fields, hfc.params_to_hf(model, _weights(m, model.num_labels), _stacks(m), aliases=False)


# What hf_common.load_hf_dir / save_hf_dir need of BERT; num_labels is compared too, since
# it decides whether the model has a classifier.
DIR_FAMILIES = (
    hfc.Family(
        "bert", "bert", _dir_config, (*_ARCH_KEYS, "num_labels"), _dir_import, _dir_export,
        {"num_labels": 0},
    ),
)  # fmt: skip


__all__ = [
    "DIR_FAMILIES",
    "config_from_hf_bert",
    "export_hf_bert",
    "hf_bert_config",
    "hf_bert_config_dict",
    "hf_bert_state_dict",
    "import_hf_bert",
]
