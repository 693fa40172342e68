"""Hugging Face conversion checks its configuration both ways: a setting that one side
cannot express is refused with a ValueError naming the jaxformer key (``model.KEY``) or
the Hugging Face field, and a setting both sides have converts to the same logits.

Each test is one mismatch that used to convert silently wrong (or not at all), on tiny
random models built here. Skipped when torch or transformers is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_logits import SRC, VOCAB  # noqa: E402
from hf_logits import bert_logits as _bert_logits  # noqa: E402
from hf_logits import decoder_logits as _decoder_logits  # noqa: E402
from hf_logits import t5_logits as _t5_logits  # noqa: E402
from hf_logits import tokens as _tokens  # noqa: E402

from jaxformer import hf  # noqa: E402
from jaxformer.config import CHOICES  # noqa: E402
from jaxformer.hf import bert as hf_bert  # noqa: E402
from jaxformer.hf import common as hf_common  # noqa: E402
from jaxformer.hf import decoder as hf_decoder  # noqa: E402
from jaxformer.hf import t5 as hf_t5  # noqa: E402
from jaxformer.model import T5, Bert, DecoderLM, ModelConfig  # noqa: E402

RTOL = 1e-4  # max |jaxformer - transformers| / max |transformers|, float32


# -- tiny models --------------------------------------------------------------------------


def _perturbed(model: Any, seed: int = 0) -> Any:
    """Noise on every parameter: zero biases and unit norm scales would hide a mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _gpt2_config(**kwargs: Any) -> Any:
    return transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager", **kwargs,
    )  # fmt: skip


def _llama_config(**kwargs: Any) -> Any:
    return transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=500.0,
        max_position_embeddings=64, attn_implementation="eager", **kwargs,
    )  # fmt: skip


def _bert_config(**kwargs: Any) -> Any:
    return transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager", **kwargs,
    )  # fmt: skip


def _t5_config(**kwargs: Any) -> Any:
    """T5.1.1 style by default: gated GELU, no output scaling."""
    fields = dict(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.T5Config(**{**fields, **kwargs})


def _gpt2(**kwargs: Any) -> Any:
    torch.manual_seed(0)
    return _perturbed(transformers.GPT2LMHeadModel(_gpt2_config(**kwargs)), 0)


def _llama(**kwargs: Any) -> Any:
    torch.manual_seed(1)
    return _perturbed(transformers.LlamaForCausalLM(_llama_config(**kwargs)), 1)


def _bert(**kwargs: Any) -> Any:
    torch.manual_seed(2)
    return _perturbed(transformers.BertForPreTraining(_bert_config(**kwargs)), 2)


def _t5(**kwargs: Any) -> Any:
    torch.manual_seed(3)
    return _perturbed(transformers.T5ForConditionalGeneration(_t5_config(**kwargs)), 3)


MAKERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "t5": _t5}
CONFIG_FROM_HF = {
    "gpt2": hf.config_from_hf,
    "llama": hf.config_from_hf,
    "bert": hf.config_from_hf_bert,
    "t5": hf.config_from_hf_t5,
}
IMPORT = {
    "gpt2": hf.import_hf,
    "llama": hf.import_hf,
    "bert": hf.import_hf_bert,
    "t5": hf.import_hf_t5,
}
ARCH_KEYS = {**hf_decoder.ARCH_KEYS, "bert": hf_bert.ARCH_KEYS, "t5": hf_t5.ARCH_KEYS}


def _jax_logits(model: Any) -> np.ndarray:
    tokens = jnp.asarray(_tokens(0))
    if isinstance(model, T5):
        return np.asarray(_t5_logits(model, jnp.asarray(_tokens(1, SRC)), tokens))
    return np.asarray((_bert_logits if isinstance(model, Bert) else _decoder_logits)(model, tokens))


def _hf_logits(model: Any) -> np.ndarray:
    tokens = torch.from_numpy(_tokens(0)).long()
    with torch.no_grad():
        if isinstance(model, transformers.T5ForConditionalGeneration):
            src = torch.from_numpy(_tokens(1, SRC)).long()
            return model(input_ids=src, decoder_input_ids=tokens).logits.numpy()
        if isinstance(model, transformers.BertForPreTraining):
            return model(input_ids=tokens).prediction_logits.numpy()
        return model(tokens).logits.numpy()


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _random_model(cls: type, cfg: Any, **kwargs: Any) -> Any:
    """A jaxformer model made from ``cfg``, every parameter random (biases, scales too)."""
    m = ModelConfig.from_config(cfg.model)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(m, nnx.Rngs(0), **kwargs)))
    rng = np.random.default_rng(3)
    values = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state)
    return nnx.merge(graphdef, values)


def _abstract_model(cls: type, cfg: Any) -> Any:
    """A jaxformer model of ``cfg`` with no values: enough for a refusal, made at no cost."""
    m = ModelConfig.from_config(cfg.model)
    return nnx.eval_shape(lambda: cls(m, nnx.Rngs(0)))


@pytest.fixture(scope="module")
def live() -> dict[str, Any]:
    return {name: make() for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def dirs(live: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, model in live.items():
        out[name] = tmp_path_factory.mktemp(f"checks_{name}")
        model.save_pretrained(out[name], safe_serialization=True)
    return out


# -- every key that changes what the weights compute is compared --------------------------

# ModelConfig fields that never change what a set of weights computes: layout, precision,
# the attention kernel, training-only settings.
FREE = {"scan_layers", "remat", "dtype", "param_dtype", "dropout", "init_std", "attention"}
MOE_SIZES = {"moe_top_k", "moe_capacity_factor", "moe_d_ff", "moe_aux_loss", "moe_z_loss"}
T5_ONLY = {"num_encoder_layers", "relative_buckets", "relative_max_distance"}
# ...and those that do not apply to a model type (the moe_* sizes only matter with
# experts, which no model type has; positions other than RoPE ignore rope_base ...).
NOT_APPLICABLE = {
    "gpt2": {"rope_base", "type_vocab_size", *T5_ONLY, *MOE_SIZES},
    "llama": {"type_vocab_size", *T5_ONLY, *MOE_SIZES},
    "bert": {"rope_base", "sliding_window", "moe_experts", *T5_ONLY, *MOE_SIZES},
    "t5": {"max_len", "rope_base", "type_vocab_size", "sliding_window", "moe_experts", *MOE_SIZES},
}


@pytest.mark.parametrize("model_type", sorted(ARCH_KEYS))
def test_every_model_key_is_compared_or_free(model_type):
    """Every ModelConfig field is compared on import (the model type's ARCH_KEYS), free,
    or does not apply to the model type: a field added later must be placed, not forgotten."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    compared = set(ARCH_KEYS[model_type])
    assert not compared & (FREE | NOT_APPLICABLE[model_type])
    assert fields - FREE - NOT_APPLICABLE[model_type] == compared, "unplaced or unknown keys"
    assert set(hf.MODEL_TYPES[model_type].arch_keys) >= compared


def _changed(value: Any, key: str) -> Any:
    """Another valid-looking value of a model key."""
    choices = CHOICES.get(f"model.{key}")
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value * 2


def _with_changed(cfg: Any, key: str) -> Any:
    cfg = cfg.copy_and_resolve_references()
    # Compare resolved values: 0 (num_kv_heads, head_dim) means "as num_heads / d_model".
    resolved = getattr(ModelConfig.from_config(cfg.model), key, cfg.model.get(key))
    cfg.model[key] = _changed(resolved, key)
    return cfg


CASES = [(model_type, key) for model_type in sorted(ARCH_KEYS) for key in ARCH_KEYS[model_type]]


@pytest.mark.parametrize("model_type, key", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_import_refuses_a_config_that_differs(live, model_type, key):
    """From a live transformers model: the config given is compared with the model's,
    key by key (T5's was never compared: any config was accepted)."""
    source = live[model_type]
    cfg = _with_changed(CONFIG_FROM_HF[model_type](source.config), key)
    with pytest.raises(ValueError, match=rf"model\.{key}\b"):
        IMPORT[model_type](source, cfg)


DIR_CASES = [(name, key) for name in sorted(ARCH_KEYS) for key in hf.MODEL_TYPES[name].arch_keys]


@pytest.mark.parametrize("model_type, key", DIR_CASES, ids=[f"{f}-{k}" for f, k in DIR_CASES])
def test_load_hf_dir_refuses_a_config_that_differs(dirs, model_type, key):
    cfg = _with_changed(hf.config_from_hf_dir(dirs[model_type]), key)
    with pytest.raises(ValueError, match=rf"model\.{key}\b"):
        hf.load_hf_dir(dirs[model_type], cfg)


# -- attention scaling --------------------------------------------------------------------


GPT2_VARIANTS = {
    "unscaled": {"scale_attn_weights": False},
    "upcast": {"reorder_and_upcast_attn": True},
    "untied": {"tie_word_embeddings": False},
}


@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_gpt2_variants_match(variant, tmp_path):
    """GPT-2 ``scale_attn_weights=False`` is ``model.scale_attention=False`` (it used to be
    refused); upcast attention and an untied head convert as they are. Both ways, live
    and through a directory."""
    kwargs = GPT2_VARIANTS[variant]
    source = _gpt2(**kwargs)
    cfg = hf.config_from_hf(source.config)
    assert cfg.model.scale_attention == kwargs.get("scale_attn_weights", True)
    want = _hf_logits(source)
    model = hf.import_hf(source)
    assert _rel_diff(_jax_logits(model), want) < RTOL
    source.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert _rel_diff(_jax_logits(hf.load_hf_dir(tmp_path / "hf")), want) < RTOL
    hf.save_hf_dir(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert reloaded.config.scale_attn_weights == cfg.model.scale_attention
    assert _rel_diff(_hf_logits(reloaded), want) < RTOL


def _decoder_cfg(gpt2: bool = False, **overrides: Any) -> Any:
    cfg = hf.config_from_hf(_gpt2_config() if gpt2 else _llama_config())
    cfg.model.update(overrides)
    return cfg


def test_gpt2_unscaled_attention_exports(tmp_path):
    """A jaxformer GPT-2 with ``model.scale_attention=False`` exports with
    ``scale_attn_weights=False``: transformers computes its logits."""
    model = _random_model(DecoderLM, _decoder_cfg(gpt2=True, scale_attention=False))
    exported = hf.export_hf(model, attn_implementation="eager")
    assert exported.config.scale_attn_weights is False
    assert _rel_diff(_jax_logits(model), _hf_logits(exported)) < RTOL
    hf.save_hf_dir(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["scale_attn_weights"] is False


def test_llama_unscaled_attention_is_refused(live, tmp_path):
    """LLaMA always divides by sqrt(head_dim): ``model.scale_attention=False`` is refused
    on import (live, state dict, directory) and on export (config, live, directory)."""
    cfg = _decoder_cfg(scale_attention=False)
    source = live["llama"]
    match = r"model\.scale_attention=False"
    for run in (
        lambda: hf.import_hf(source, cfg),
        lambda: hf.import_hf({k: v.numpy() for k, v in source.state_dict().items()}, cfg),
        lambda: hf.hf_config_dict(cfg),
    ):
        with pytest.raises(ValueError, match=match):
            run()
    model = _abstract_model(DecoderLM, cfg)
    with pytest.raises(ValueError, match=match):
        hf.export_hf(model)
    with pytest.raises(ValueError, match=match):
        hf.save_hf_dir(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_per_layer_scaling_names_the_field():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        hf.config_from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


# -- tied tensors ---------------------------------------------------------------------------


def test_bert_untied_decoder_is_refused(tmp_path):
    """BERT with ``tie_word_embeddings=False`` has an MLM decoder of its own, which
    jaxformer's Bert (scoring with the word table) cannot hold: it used to be dropped,
    logits off by about 1. Refused live, as a state dict and from a directory."""
    source = _bert(tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        hf.import_hf_bert(source)
    cfg = hf.config_from_hf_bert(_bert_config())  # the same model, said to be tied
    with pytest.raises(ValueError, match=r"'cls\.predictions\.decoder\.weight' differs"):
        hf.import_hf_bert({k: v.numpy() for k, v in source.state_dict().items()}, cfg)
    source.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        hf.load_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        hf.config_from_hf_dir(tmp_path)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_decoder_untied_head_under_a_tied_config_is_refused(model_type):
    """A state dict whose ``lm_head.weight`` is not the embedding, imported with a tied
    config: the head used to be dropped without a word."""
    source = MAKERS[model_type](tie_word_embeddings=False)
    cfg = hf.config_from_hf(source.config)
    cfg.model.tie_embeddings = True
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    with pytest.raises(ValueError, match=r"'lm_head\.weight' differs.*model\.tie_embeddings"):
        hf.import_hf(state, cfg)


def test_t5_scaled_but_untied_head_is_refused():
    """transformers 5 scales T5's decoder output by ``scale_decoder_outputs`` whatever
    its head; jaxformer ties exactly when it scales, so a scaled T5 with a head of its own
    is refused (it used to import with the shared embedding as its head)."""
    source = _t5(feed_forward_proj="relu", tie_word_embeddings=True)
    assert source.config.scale_decoder_outputs
    source.lm_head.weight = torch.nn.Parameter(source.shared.weight.detach().clone() + 0.1)
    with pytest.raises(ValueError, match=r"'lm_head\.weight' differs.*scale_decoder_outputs"):
        hf.import_hf_t5(source)


# -- T5 ------------------------------------------------------------------------------------

T5_REFUSED = {
    "use_bias": True,
    "scale_embeddings": True,
    "norm": "layernorm",
    "scale_attention": True,
    "num_kv_heads": 2,
}


def _t5_cfg(**overrides: Any) -> Any:
    cfg = hf.config_from_hf_t5(_t5_config())
    cfg.model.update(overrides)
    return cfg


@pytest.mark.parametrize("key", sorted(T5_REFUSED))
def test_t5_export_refuses_what_t5_lacks(key, tmp_path):
    """T5 has no biases, embedding scaling, LayerNorm, scaled logits or grouped KV heads:
    a jaxformer T5 with one used to export as a T5 computing something else (or, for
    grouped KV heads, a directory transformers could not load)."""
    cfg = _t5_cfg(**{key: T5_REFUSED[key]})
    model = _abstract_model(T5, cfg)
    match = rf"model\.{key}=.*no Hugging Face T5 equivalent"
    with pytest.raises(ValueError, match=match):
        hf.hf_t5_config_dict(cfg)
    with pytest.raises(ValueError, match=match):
        hf.export_hf_t5(model)
    with pytest.raises(ValueError, match=match):
        hf.save_hf_dir(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", sorted(T5_REFUSED))
def test_t5_state_dict_import_refuses_what_t5_lacks(live, key):
    state = {k: v.numpy() for k, v in live["t5"].state_dict().items()}
    with pytest.raises(ValueError, match=rf"model\.{key}="):
        hf.import_hf_t5(state, _t5_cfg(**{key: T5_REFUSED[key]}))


T5_MLPS = {"gated-silu": "swiglu", "gelu": "gelu_exact", "gelu_new": "gelu", "relu": "relu"}


@pytest.mark.parametrize("proj", sorted(T5_MLPS))
def test_t5_feed_forward_projections_match(proj, tmp_path):
    """Every feed-forward projection jaxformer has an MLP for converts both ways (export
    of ``swiglu``, ``gelu``, ``gelu_exact`` used to fail with a KeyError), with
    non-default relative-position buckets."""
    source = _t5(
        feed_forward_proj=proj, relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )  # fmt: skip
    model = hf.import_hf_t5(source)
    assert model.cfg.mlp == T5_MLPS[proj]
    want = _hf_logits(source)
    assert _rel_diff(_jax_logits(model), want) < RTOL
    exported = hf.export_hf_t5(model, attn_implementation="eager")
    assert _rel_diff(_hf_logits(exported), want) < RTOL
    hf.save_hf_dir(model, tmp_path)
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert _rel_diff(_hf_logits(reloaded), want) < RTOL


def test_t5_uses_the_activation_fields_transformers_reads():
    """transformers' T5 layers read ``is_gated_act`` and ``dense_act_fn``, which a config
    may store apart from ``feed_forward_proj``: jaxformer follows them, and refuses what
    it has no MLP for (``feed_forward_proj`` alone used to decide)."""
    fields = {**_t5_config(feed_forward_proj="relu").to_dict()}
    assert (fields["is_gated_act"], fields["dense_act_fn"]) == (False, "relu")
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-relu'"):
        hf.config_from_hf_t5({**fields, "feed_forward_proj": "gated-relu", "is_gated_act": None})
    with pytest.raises(ValueError, match="is_gated_act=True, dense_act_fn='relu'"):
        hf.config_from_hf_t5({**fields, "is_gated_act": True})
    stale = {**fields, "feed_forward_proj": "gated-gelu", "is_gated_act": True}
    with pytest.raises(ValueError, match="dense_act_fn='relu'"):
        hf.config_from_hf_t5(stale)
    # What transformers builds from such a dict is what jaxformer reads.
    built = transformers.T5Config.from_dict({**fields, "feed_forward_proj": "gated-gelu"})
    assert (built.is_gated_act, built.dense_act_fn) == (False, "relu")
    assert hf.config_from_hf_t5(built).model.mlp == "relu"


# -- export: what no model type can hold ---------------------------------------------------

EXPORT_REFUSED = {
    "gpt2": (DecoderLM, [
        ("num_kv_heads", 2), ("head_dim", 32), ("use_bias", False), ("norm", "rmsnorm"),
        ("mlp", "swiglu"), ("mlp", "gelu_exact"), ("norm_position", "post"),
        ("scale_embeddings", True), ("sliding_window", 8), ("moe_experts", 2),
    ]),
    "llama": (DecoderLM, [
        ("scale_attention", False), ("norm", "layernorm"), ("mlp", "gelu"),
        ("position", "alibi"), ("position", "sinusoidal"), ("position", "none"),
        ("norm_position", "post"), ("scale_embeddings", True), ("sliding_window", 8),
        ("moe_experts", 2),
    ]),
    "bert": (Bert, [
        ("scale_attention", False), ("use_bias", False), ("norm", "rmsnorm"), ("mlp", "gelu"),
        ("norm_position", "pre"), ("position", "rope"), ("num_kv_heads", 2),
        ("head_dim", 32), ("scale_embeddings", True), ("tie_embeddings", False),
        ("family", "decoder"),
    ]),
}  # fmt: skip
EXPORT_CASES = [
    (model_type, key, value)
    for model_type, (_, cases) in EXPORT_REFUSED.items()
    for key, value in cases
]


def _export_cfg(model_type: str, key: str, value: Any) -> Any:
    if model_type == "bert":
        cfg = hf.config_from_hf_bert(_bert_config())
        cfg.model[key] = value
        return cfg
    return _decoder_cfg(model_type == "gpt2", **{key: value})


@pytest.mark.parametrize(
    "model_type, key, value", EXPORT_CASES, ids=[f"{f}-{k}-{v}" for f, k, v in EXPORT_CASES]
)
def test_export_refuses_what_the_model_type_lacks(model_type, key, value, tmp_path):
    """Config, live model and directory export each refuse, naming the key, and write
    nothing."""
    cls = EXPORT_REFUSED[model_type][0]
    cfg = _export_cfg(model_type, key, value)
    model = _abstract_model(cls, cfg)
    match = rf"model\.{key}={re.escape(repr(value))}"
    to_config = hf.hf_bert_config_dict if model_type == "bert" else hf.hf_config_dict
    to_model = hf.export_hf_bert if model_type == "bert" else hf.export_hf
    for run in (lambda: to_config(cfg), lambda: to_model(model)):
        with pytest.raises(ValueError, match=match):
            run()
    with pytest.raises(ValueError, match=match):
        hf.save_hf_dir(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_round_trip_check_names_what_the_config_drops():
    """The backstop every config export runs: the Hugging Face config written, read back,
    must be the same model (here a hand-made mismatch stands for a key no field carries)."""
    m = ModelConfig.from_config(_decoder_cfg().model)
    other = _decoder_cfg(norm_eps=1e-3)
    with pytest.raises(ValueError, match=r"model\.norm_eps=1e-05.*reads back as model\.norm_eps"):
        hf_common.check_round_trip(m, other, hf_decoder.ARCH_KEYS["llama"], "llama")


def test_write_hf_dir_checks_the_config(tmp_path):
    """write_hf_dir refuses a config.json jaxformer would not read back the same, before
    writing anything."""
    fields = hf.hf_config_dict(_decoder_cfg())
    tensors = {"model.embed_tokens.weight": np.zeros((VOCAB, 64), np.float32)}
    scaled = {**fields, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
        hf.write_hf_dir(tmp_path / "a", scaled, tensors)
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        hf.write_hf_dir(tmp_path / "b", {**fields, "model_type": "mamba"}, tensors)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- BERT labels ----------------------------------------------------------------------------


def test_bert_num_labels_of_the_config_is_honoured():
    """``model.num_labels`` used to be ignored by import_hf_bert: a classifier of another
    size imported as it was. Now it must agree; without a classifier one is made."""
    config = _bert_config(num_labels=3)
    torch.manual_seed(4)
    source = _perturbed(transformers.BertForSequenceClassification(config), 4)
    cfg = hf.config_from_hf_bert(config)
    cfg.model.num_labels = 5
    with pytest.raises(ValueError, match=r"model\.num_labels=5 .* 3 labels"):
        hf.import_hf_bert(source, cfg)
    cfg.model.num_labels = 3
    assert hf.import_hf_bert(source, cfg).num_labels == 3
    assert hf.import_hf_bert(_bert(), cfg).num_labels == 3  # a fresh classifier
