"""BERT weights in and out of :class:`jaxformer.model.Bert`.

The config translation (checked both ways, :mod:`jaxformer.hf.common`) and the
name/shape map; the map's walk (through numpy, every name and shape checked) is
:mod:`jaxformer.hf.mapping`'s, and ``torch``/``transformers`` are imported only inside
the functions that need them.

Supported ``transformers`` sources: ``BertForPreTraining`` (all heads), ``BertForMaskedLM``
(no pooler/NSP), ``BertForSequenceClassification`` (no MLM/NSP), ``BertModel``, or their
state dicts. Heads missing from the source keep a fresh random initialisation (seeded).
Only absolute positions, exact GELU (``hidden_act="gelu"``), an MLM decoder tied to the
word embeddings (``tie_word_embeddings=True``), encoder-only configs.

Example::

    from transformers import BertForPreTraining
    from jaxformer import hf

    torch_model = BertForPreTraining.from_pretrained("bert-base-uncased")
    cfg = hf.config_from_hf_bert(torch_model.config)
    model = hf.import_hf_bert(torch_model, cfg)
    hf.export_hf_bert(model).save_pretrained("out/")
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
from jaxformer.model import Bert, ModelConfig
from jaxformer.tasks.bert import BERT

# Keys that change the function a set of BERT weights computes (rope_base, the moe_* and
# T5 keys, sliding_window do not apply to a BERT).
ARCH_KEYS = (
    "family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "d_ff", "max_len", "type_vocab_size", "position", "norm", "norm_position", "norm_eps",
    "mlp", "use_bias", "tie_embeddings", "scale_embeddings", "scale_attention",
)  # fmt: skip

# The Bert config every checkpoint needs, besides the sizes read from the HF config.
_FIXED = {
    "family": BERT.name,
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

# jaxformer's Bert scores the MLM with the word table itself (Bert.mlm_logits).
_TIED_DECODER = (
    "jaxformer's BERT always ties its MLM decoder to the word embeddings: "
    "model.tie_embeddings=True, Hugging Face tie_word_embeddings=True"
)


def config_from_hf_bert(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config whose model section reproduces a transformers
    ``BertConfig`` (or its config.json dict); raises ValueError, naming the field, for
    what Bert cannot do."""
    act = common.get(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"BERT hidden_act {act!r} is unsupported: only 'gelu' (exact, erf)")
    pos = common.get(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
        raise ValueError(f"BERT position_embedding_type {pos!r} is unsupported (only absolute)")
    if common.get(hf_config, "is_decoder", False) or common.get(
        hf_config, "add_cross_attention", False
    ):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is unsupported")
    if not common.get(hf_config, "tie_word_embeddings", True):
        raise ValueError(
            "BERT tie_word_embeddings=False (an MLM decoder of its own) is unsupported: "
            "jaxformer's BERT scores the MLM with the word embeddings (model.tie_embeddings)"
        )
    cfg = base_config()
    m = cfg.model
    m.update(_FIXED)
    m.vocab_size = int(common.need(hf_config, "vocab_size"))
    m.d_model = int(common.need(hf_config, "hidden_size"))
    m.num_layers = int(common.need(hf_config, "num_hidden_layers"))
    m.num_heads = int(common.need(hf_config, "num_attention_heads"))
    m.num_kv_heads = 0
    m.head_dim = 0
    m.d_ff = int(common.need(hf_config, "intermediate_size"))
    m.max_len = int(common.need(hf_config, "max_position_embeddings"))
    m.type_vocab_size = int(common.get(hf_config, "type_vocab_size", 2))
    m.norm_eps = float(common.get(hf_config, "layer_norm_eps", 1e-12))
    m.dropout = float(common.get(hf_config, "hidden_dropout_prob", 0.1) or 0.0)
    m.init_std = float(common.get(hf_config, "initializer_range", 0.02))
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def _check_bert(m: ModelConfig) -> None:
    """Raises unless ``m`` is a model a transformers BERT can hold exactly."""
    want: dict[str, Any] = dict(_FIXED)
    want.update(num_kv_heads=m.num_heads, head_dim=m.d_model // m.num_heads)
    common.check_supported(m, want, "BERT")


def hf_bert_config_dict(cfg: Any, num_labels: int = 2) -> dict[str, Any]:
    """The ``BertConfig`` fields (config.json, without ``model_type``) of a jaxformer
    Bert config; raises ValueError naming each ``model.KEY`` BERT cannot carry."""
    m = common.model_config(cfg)
    _check_bert(m)
    out = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
        max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
        layer_norm_eps=m.norm_eps, hidden_act="gelu", hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=0.0,  # jaxformer has no attention dropout
        initializer_range=m.init_std, num_labels=num_labels, tie_word_embeddings=True,
    )  # fmt: skip
    common.check_round_trip(m, config_from_hf_bert(out), ARCH_KEYS, "BERT")
    return out


def hf_bert_config(cfg: Any, num_labels: int = 2, **kwargs: Any) -> Any:
    """The transformers ``BertConfig`` for a jaxformer Bert config; ``kwargs`` (e.g.
    ``attn_implementation="eager"``) go to the config class."""
    import transformers

    return transformers.BertConfig(**{**hf_bert_config_dict(cfg, num_labels), **kwargs})


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


def _weights(m: ModelConfig, num_labels: int) -> list[hfm.Weight]:
    """BertForPreTraining's names (plus ``classifier.*`` with ``num_labels``)."""
    e = "bert.embeddings."
    out = [
        hfm.weight(e + "word_embeddings.weight", ("embed",)),
        hfm.weight(e + "position_embeddings.weight", ("pos_embed",)),
        hfm.weight(e + "token_type_embeddings.weight", ("type_embed",)),
        *hfm.norm(e + "LayerNorm", ("embed_norm",), bias=True),
    ]
    for i in range(m.num_layers):
        p, b = f"bert.encoder.layer.{i}.", ("encoder", i)
        out += hfm.attention([p + n for n in _ATTENTION], (*b, "attn"), m, bias=True)
        out += hfm.norm(p + "attention.output.LayerNorm", (*b, "attn_norm"), bias=True)
        out += hfm.dense(p + "intermediate.dense", (*b, "mlp", "up"), hfm.TRANSPOSED, hfm.SAME)
        out += hfm.dense(p + "output.dense", (*b, "mlp", "down"), hfm.TRANSPOSED, hfm.SAME)
        out += hfm.norm(p + "output.LayerNorm", (*b, "mlp_norm"), bias=True)
    for name, path, head in _HEADS:
        if head != "classifier" or num_labels > 0:
            out += hfm.dense(name, path, hfm.TRANSPOSED, hfm.SAME, head=head)
    decoder = "cls.predictions.decoder."
    return [
        *out,
        *hfm.norm("cls.predictions.transform.LayerNorm", ("mlm_norm",), bias=True, head="mlm"),
        hfm.weight("cls.predictions.bias", ("mlm_bias",), head="mlm"),
        # The MLM decoder: the word embeddings and the MLM bias again.
        hfm.weight(decoder + "weight", ("embed",), alias=True, tied_by=_TIED_DECODER),
        hfm.weight(decoder + "bias", ("mlm_bias",), alias=True, tied_by="cls.predictions.bias"),
    ]


def _stacks(m: ModelConfig) -> dict[str, int]:
    return {"encoder": m.num_layers}


# -- import / export ------------------------------------------------------------------------


def _num_labels(cfg: Any, state_dict: Mapping[str, Any], num_labels: int | None) -> int:
    """The classes of the model to build: ``num_labels`` if given (0: no classifier),
    else the config's ``model.num_labels`` when set, else the rows of the source's
    classifier (0 without one). A classifier of other rows than asked for is refused,
    not resized."""
    classifier = state_dict.get("classifier.weight")
    rows = None if classifier is None else int(classifier.shape[0])
    if num_labels is None:
        section = cfg.get("model", cfg) if hasattr(cfg, "get") else {}
        num_labels = int(section.get("num_labels", 0) or 0) or (rows or 0)
    if num_labels and rows is not None and rows != num_labels:
        raise ValueError(
            f"model.num_labels={num_labels} but the Hugging Face classifier has {rows} "
            "labels (classifier.weight): import with the checkpoint's number of labels"
        )
    return num_labels


def import_hf_bert(
    source: Any, cfg: Any = None, *, num_labels: int | None = None, seed: int = 0
) -> Bert:
    """A :class:`Bert` holding the weights of a Hugging Face BERT model or state dict.

    ``cfg`` (a full config, its model section or a ModelConfig) defaults to
    ``config_from_hf_bert(source.config)`` and is required for a bare state dict; one
    given must be a BERT model and, for a transformers source, the source's.
    ``num_labels`` defaults to the config's ``model.num_labels`` if set, else the rows of
    ``classifier.weight`` (0 without one). Heads the source lacks (pooler/NSP of
    BertForMaskedLM, ...) keep a seeded random init.
    """
    m, state_dict, derived = common.read_source(source, cfg, config_from_hf_bert, "import_hf_bert")
    _check_bert(m)
    if derived is not None:
        common.check_same_model(m, derived, ARCH_KEYS, "Hugging Face model")
    state_dict = common.with_prefix(state_dict, "bert.")  # a bare BertModel has no "bert."
    labels = _num_labels(cfg, state_dict, num_labels)

    def make(rngs: Any) -> Bert:
        return Bert(m, rngs, labels)

    params = hfm.params_from_hf(
        state_dict,
        _weights(m, labels),
        hfm.expected_params(make),
        model_type="BERT",
        stacks=_stacks(m),
        ignored=_IGNORED,
    )
    return hfm.build_model(make, params, seed)


def hf_bert_state_dict(model: Bert) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face BertForPreTraining names (plus
    ``classifier.*`` when it has one), as numpy arrays."""
    m = model.cfg
    _check_bert(m)
    return hfm.params_to_hf(model, _weights(m, model.num_labels), _stacks(m))


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
        common.check_same_model(common.model_config(cfg), m, ARCH_KEYS, "model being exported")
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
    tensors = hfm.to_torch({k: v for k, v in arrays.items() if keep(k)})
    if not as_model:
        return tensors
    import transformers

    kwargs = common.config_kwargs(attn_implementation)
    config = hf_bert_config(m, num_labels=max(model.num_labels, 1), **kwargs)
    hf_model = getattr(transformers, _HF_CLASSES[head])(config)
    return hfm.loaded(hf_model, tensors)


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
    arch = "BertForSequenceClassification" if model.num_labels else "BertForPreTraining"
    fields = hf_bert_config_dict(m, num_labels=model.num_labels or 2)
    fields.update(model_type="bert", architectures=[arch])
    return fields, hfm.params_to_hf(model, _weights(m, model.num_labels), _stacks(m), aliases=False)


def _dir_config_to_hf(cfg: Any) -> dict[str, Any]:
    labels = cfg.get("model", cfg).get("num_labels", 0) if hasattr(cfg, "get") else 0
    return hf_bert_config_dict(cfg, num_labels=labels or 2)


# What load_hf_dir / save_hf_dir / write_hf_dir need of BERT; num_labels is compared too,
# since it decides whether the model has a classifier.
HF_BERT = HFModelType(
    "bert", BERT, _dir_config, (*ARCH_KEYS, "num_labels"), _dir_import, _dir_export,
    _dir_config_to_hf, {"num_labels": 0},
)  # fmt: skip


__all__ = [
    "ARCH_KEYS",
    "HF_BERT",
    "config_from_hf_bert",
    "export_hf_bert",
    "hf_bert_config",
    "hf_bert_config_dict",
    "hf_bert_state_dict",
    "import_hf_bert",
]
