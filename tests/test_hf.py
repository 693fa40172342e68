"""Hugging Face interop: tiny random GPT-2 and LLaMA models made by ``transformers`` give
the same float32 logits in jaxformer, and come back out in a form ``transformers`` reloads.

Skipped when torch or transformers (the ``test`` extra) is not installed.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer import hf  # noqa: E402
from jaxformer.attention.dot_product import DotProduct  # noqa: E402
from jaxformer.config import base_config, check_schema, load_config  # noqa: E402
from jaxformer.model import DecoderLM, ModelConfig  # noqa: E402

BATCH, SEQ, VOCAB = 2, 48, 128
RTOL = 1e-4  # max |jaxformer - transformers| / max |transformers|, float32


def _perturb(model: Any) -> Any:
    """Adds noise to every parameter: transformers initialises biases to 0 and norm scales
    to 1, which would hide a bias or norm mapped to the wrong place."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return _perturb(transformers.GPT2LMHeadModel(config))


def _llama() -> Any:
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=500.0,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(1)
    return _perturb(transformers.LlamaForCausalLM(config))


MAKERS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def hf_model(request: pytest.FixtureRequest) -> Any:
    return MAKERS[request.param]()


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)


@nnx.jit
def _forward(model: DecoderLM, tokens: jax.Array) -> jax.Array:
    segment_ids = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return model(tokens, segment_ids, positions)


def _jax_logits(model: DecoderLM, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens)))


def _hf_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _config(hf_model: Any, scan_layers: bool) -> Any:
    cfg = hf.config_from_hf(hf_model.config)
    cfg.model.scan_layers = scan_layers
    return check_schema(cfg)


# -- import ----------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_import_matches_transformers(hf_model, tokens, scan_layers):
    model = hf.import_hf(hf_model, _config(hf_model, scan_layers))
    assert _rel_diff(_jax_logits(model, tokens), _hf_logits(hf_model, tokens)) < RTOL


def test_import_runs_the_configs_attention_backend(hf_model, tokens):
    """``model.attention_impl="dot_product"``: the imported model calls that backend (ring
    attention in front of it on meshes that split sequences), live and from a state dict,
    and computes transformers' logits."""
    cfg = _config(hf_model, scan_layers=True)
    cfg.model.attention_impl = "dot_product"
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    for model in (hf.import_hf(hf_model, cfg), hf.import_hf(state, cfg)):
        backend = model.cfg.attention
        assert isinstance(getattr(backend, "local", backend), DotProduct), backend
        assert _rel_diff(_jax_logits(model, tokens), _hf_logits(hf_model, tokens)) < RTOL


def test_import_from_state_dict_numpy(hf_model, tokens):
    """A bare state dict (here numpy, as read from safetensors) with an explicit config;
    for GPT-2, that of the headless ``GPT2Model``, whose names lack ``transformer.``."""
    source = hf_model.transformer if hf.model_type_of_hf(hf_model.config) == "gpt2" else hf_model
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    model = hf.import_hf(state, hf.config_from_hf(hf_model.config))
    assert _rel_diff(_jax_logits(model, tokens), _hf_logits(hf_model, tokens)) < RTOL


def test_import_checks_names_and_shapes(hf_model):
    """A name the map needs and the source lacks, a name the map has no place for and a
    shape the config does not give each raise, naming what is wrong."""
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    cfg = hf.config_from_hf(hf_model.config)
    dropped = sorted(k for k in state if ".1." in k)[0]  # a parameter of the second layer
    with pytest.raises(KeyError, match=re.escape(dropped)):
        hf.import_hf({k: v for k, v in state.items() if k != dropped}, cfg)
    with pytest.raises(ValueError, match=r"no place for: \['extra.weight'\]"):
        hf.import_hf({**state, "extra.weight": state[dropped]}, cfg)
    cfg.model.vocab_size = 2 * VOCAB
    with pytest.raises(ValueError, match="'embed' has shape"):
        hf.import_hf(state, cfg)


def test_config_from_hf():
    gpt2 = hf.config_from_hf(_gpt2().config).model
    assert (gpt2.d_model, gpt2.num_layers, gpt2.num_heads, gpt2.d_ff) == (64, 2, 4, 256)
    assert (gpt2.position, gpt2.norm, gpt2.mlp) == ("learned", "layernorm", "gelu")
    assert gpt2.norm_eps == 1e-5
    assert gpt2.use_bias and gpt2.tie_embeddings and gpt2.max_len == 64
    llama = hf.config_from_hf(_llama().config).model
    assert (llama.num_heads, llama.num_kv_heads, llama.d_ff) == (4, 2, 128)
    assert (llama.position, llama.norm, llama.mlp) == ("rope", "rmsnorm", "swiglu")
    assert (llama.rope_base, llama.norm_eps) == (500.0, 1e-5)
    assert not llama.use_bias and not llama.tie_embeddings
    # A config.json dict works as well as a config object.
    assert hf.config_from_hf(_llama().config.to_dict()).model.to_dict() == llama.to_dict()


# -- export ----------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_export_round_trip_is_exact(hf_model, tokens, scan_layers):
    """Import then export gives back the original tensors bit for bit, under the names
    and shapes ``load_state_dict(strict=True)`` accepts."""
    model = hf.import_hf(hf_model, _config(hf_model, scan_layers))
    exported = hf.export_hf(model, as_model=False)
    original = hf_model.state_dict()
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    reloaded = type(hf_model)(hf_model.config)
    reloaded.load_state_dict(exported, strict=True)
    np.testing.assert_array_equal(_hf_logits(reloaded.eval(), tokens), _hf_logits(hf_model, tokens))


def test_export_save_pretrained_reloads(hf_model, tokens, tmp_path):
    model = hf.import_hf(hf_model)
    jax_logits = _jax_logits(model, tokens)
    hf.export_hf(model, attn_implementation="eager").save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(hf_model)
    assert _rel_diff(jax_logits, _hf_logits(reloaded, tokens)) < RTOL
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens))


def _jaxformer_model(overrides: dict[str, Any], scan_layers: bool) -> DecoderLM:
    """A model made by jaxformer, every parameter (biases, norm scales too) random."""
    cfg = base_config()
    cfg.model.update({"vocab_size": VOCAB, "d_model": 64, "num_layers": 2, "num_heads": 4})
    cfg.model.update({"d_ff": 128, "max_len": 64, "scan_layers": scan_layers, **overrides})
    model = nnx.eval_shape(lambda: DecoderLM(ModelConfig.from_config(cfg.model), nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(3)
    values = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state)
    return nnx.merge(graphdef, values)


JAXFORMER_VARIANTS = {
    # GPT-2 style with an untied head, ReLU and a non-default d_ff.
    "gpt2-untied-relu": {
        "position": "learned", "norm": "layernorm", "norm_eps": 1e-5, "mlp": "relu",
        "use_bias": True, "tie_embeddings": False, "d_ff": 96,
    },
    # LLaMA style with MQA, biases, a tied head and a head width other than d/h.
    "llama-mqa-bias-tied": {
        "num_kv_heads": 1, "head_dim": 16, "use_bias": True, "tie_embeddings": True,
        "rope_base": 1000.0, "norm_eps": 1e-5,
    },
}  # fmt: skip


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("variant", sorted(JAXFORMER_VARIANTS))
def test_export_of_jaxformer_model(variant, scan_layers, tokens):
    """A model trained in jaxformer, exported: transformers computes the same logits."""
    model = _jaxformer_model(JAXFORMER_VARIANTS[variant], scan_layers)
    exported = hf.export_hf(model, attn_implementation="eager")
    assert _rel_diff(_jax_logits(model, tokens), _hf_logits(exported, tokens)) < RTOL
    again = hf.import_hf(exported, _config(exported, not scan_layers))
    np.testing.assert_array_equal(_jax_logits(again, tokens), _jax_logits(model, tokens))


# -- what does not convert ---------------------------------------------------------------


def test_import_rejects_a_config_that_computes_something_else():
    llama = _llama()
    cfg = hf.config_from_hf(llama.config)
    cfg.model.norm_eps = 1e-6  # not in the weights: shapes alone would not catch it
    with pytest.raises(ValueError, match="model.norm_eps"):
        hf.import_hf(llama, cfg)


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        hf.config_from_hf(
            {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
        )
    with pytest.raises(ValueError, match="activation_function"):
        hf.config_from_hf({"model_type": "gpt2", "activation_function": "gelu"})
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type"):
        hf.config_from_hf({"model_type": "t5"})
    cfg = base_config()
    cfg.model.position = "alibi"
    with pytest.raises(ValueError, match="no Hugging Face llama equivalent"):
        hf.hf_config_dict(cfg)
    cfg = base_config()
    cfg.model.norm_position = "post"
    with pytest.raises(ValueError, match="norm_position"):
        hf.export_hf(DecoderLM(ModelConfig.from_config(cfg.model), nnx.Rngs(0)))


# Options of LlamaConfig that DecoderLM cannot compute today. Each test is what parity
# would look like; strict, so it fails (XPASS) once the model grows the feature.


def _llama_variant(**kwargs: Any) -> Any:
    base = _llama().config.to_dict()
    base.update(kwargs)
    return _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)))


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="model.use_bias covers attention and MLP together; LLaMA's attention_bias=True "
    "with mlp_bias=False (q/k/v/o biases, none in the MLP) needs separate flags in "
    "layers.Attention and layers.MLP",
)
def test_llama_attention_bias_without_mlp_bias(tokens):
    source = _llama_variant(attention_bias=True, mlp_bias=False)
    model = hf.import_hf(source)
    assert _rel_diff(_jax_logits(model, tokens), _hf_logits(source, tokens)) < RTOL


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="layers.rope has no frequency scaling: Llama 3.1+ checkpoints use rope_type "
    "'llama3' (factor, low/high_freq_factor, original_max_position_embeddings)",
)
def test_llama3_rope_scaling(tokens):
    rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    }  # fmt: skip
    source = _llama_variant(rope_parameters=rope, rope_scaling=rope)
    model = hf.import_hf(source)
    assert _rel_diff(_jax_logits(model, tokens), _hf_logits(source, tokens)) < RTOL


# -- presets as transformers sees them ----------------------------------------------------


@pytest.mark.parametrize(
    "preset, count",
    [("gpt2_124m", 124_439_808), ("gpt2_1558m", 1_557_611_200), ("llama2_7b", 6_738_415_616)],
)
def test_preset_counts_in_transformers(repo_root, preset, count):
    """The presets, built by transformers on the meta device (no memory), have the
    reference counts: the configs describe the same models as Hugging Face's."""
    cfg = load_config(str(repo_root / "configs" / f"{preset}.py"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf.hf_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == count
