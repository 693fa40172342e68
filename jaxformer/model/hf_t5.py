"""Hugging Face interop for T5: ``T5ForConditionalGeneration`` weights in and out of :class:`T5`.

Kept apart from ``hf.py`` (decoder-only families) since T5's two stacks, shared bias tables
and tying rules have little in common with them. ``torch``/``transformers`` are imported
lazily. T5 1.0 (``feed_forward_proj='relu'``, tied, decoder output scaled by d_model^-0.5)
and T5.1.1 (``'gated-gelu'``, untied head, no scaling) are supported. transformers 5 always
reports ``tie_word_embeddings=True`` for T5 and keeps the scaling in
``scale_decoder_outputs``; an untied checkpoint simply has a different ``lm_head.weight``.

    model = hf_t5.import_hf_t5(torch_model, hf_t5.config_from_hf_t5(torch_model.config))
    hf_t5.export_hf_t5(model).save_pretrained("out/")
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
from jaxformer.model.decoder import ModelConfig
from jaxformer.model.hf import _flatten, _name, _nest, _to_numpy
from jaxformer.model.t5 import T5

Path = tuple[str | int, ...]


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def _tied(hf_config: Any) -> bool:
    """Whether the head is tied (and the decoder output scaled): T5 1.0 yes, T5.1.1 no."""
    scale = _get(hf_config, "scale_decoder_outputs")
    return bool(_get(hf_config, "tie_word_embeddings", True) if scale is None else scale)


def config_from_hf_t5(hf_config: Any) -> ml_collections.ConfigDict:
    """A full jaxformer config for a transformers ``T5Config`` (or config.json dict)."""
    proj = _get(hf_config, "feed_forward_proj", "relu")
    mlp = {"relu": "relu", "gated-gelu": "geglu"}.get(proj)
    if mlp is None:
        raise ValueError(f"T5 feed_forward_proj {proj!r} is not supported (relu, gated-gelu)")
    c = base_config()
    m = c.model
    m.family = "t5"
    m.vocab_size = int(_get(hf_config, "vocab_size"))
    m.d_model = int(_get(hf_config, "d_model"))
    m.d_ff = int(_get(hf_config, "d_ff"))
    m.num_heads = int(_get(hf_config, "num_heads"))
    m.head_dim = int(_get(hf_config, "d_kv"))
    m.num_encoder_layers = int(_get(hf_config, "num_layers"))
    m.num_layers = int(_get(hf_config, "num_decoder_layers") or m.num_encoder_layers)
    m.relative_buckets = int(_get(hf_config, "relative_attention_num_buckets", 32))
    m.relative_max_distance = int(_get(hf_config, "relative_attention_max_distance", 128))
    m.norm_eps = float(_get(hf_config, "layer_norm_epsilon", 1e-6))
    m.position = "none"
    m.norm, m.norm_position, m.mlp = "rmsnorm", "pre", mlp
    m.use_bias = False
    m.tie_embeddings = _tied(hf_config)
    m.scale_embeddings = False
    m.scale_attention = False
    m.max_len = 512
    return c


def _model_config(cfg: Any) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    return ModelConfig.from_config(cfg.model if "model" in cfg else cfg)


def hf_t5_config(m: ModelConfig, **kwargs: Any) -> Any:
    """The transformers ``T5Config`` for a jaxformer T5 config."""
    import transformers

    return transformers.T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.d_ff,
        num_layers=m.num_encoder_layers, num_decoder_layers=m.num_layers,
        num_heads=m.num_heads, relative_attention_num_buckets=m.relative_buckets,
        relative_attention_max_distance=m.relative_max_distance, layer_norm_epsilon=m.norm_eps,
        feed_forward_proj={"relu": "relu", "geglu": "gated-gelu"}[m.mlp],
        tie_word_embeddings=m.tie_embeddings, dropout_rate=m.dropout, **kwargs,
    )  # fmt: skip


def _attn_pairs(hf: str, ours: Path, m: ModelConfig) -> list[tuple[str, Path, Any, Any]]:
    """(HF name, our path, HF->ours, ours->HF) for one attention's q, k, v, o."""
    d, h, dh = m.d_model, m.num_heads, m.head_dim
    out = []
    for n in "qkv":
        out.append((
            f"{hf}.{n}.weight", (*ours, n, "kernel"),
            lambda w: w.T.reshape(d, h, dh), lambda k: k.reshape(d, h * dh).T,
        ))  # fmt: skip
    out.append((
        f"{hf}.o.weight", (*ours, "o", "kernel"),
        lambda w: w.T.reshape(h, dh, d), lambda k: k.reshape(h * dh, d).T,
    ))  # fmt: skip
    return out


def _pairs(m: ModelConfig) -> list[tuple[str, Path, Any, Any]]:
    """Every (HF name, our unstacked path, to-ours, to-HF) of a T5 of config ``m``."""
    same, t = (lambda w: w), (lambda w: w.T)
    pairs = [("shared.weight", ("embed",), same, same)]
    if not m.tie_embeddings:
        pairs.append(("lm_head.weight", ("lm_head", "kernel"), t, t))

    def mlp(hf: str, ours: Path) -> list[tuple[str, Path, Any, Any]]:
        ups = [("wi_0", "gate"), ("wi_1", "up")] if m.mlp == "geglu" else [("wi", "up")]
        out = [(f"{hf}.{a}.weight", (*ours, b, "kernel"), t, t) for a, b in ups]
        return [*out, (f"{hf}.wo.weight", (*ours, "down", "kernel"), t, t)]

    for stack, layers in (("encoder", m.num_encoder_layers), ("decoder", m.num_layers)):
        pairs.append((
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (f"{stack}_relative_bias", "table"), same, same,
        ))  # fmt: skip
        pairs.append((f"{stack}.final_layer_norm.weight", (f"{stack}_norm", "scale"), same, same))
        for i in range(layers):
            p, b = f"{stack}.block.{i}.layer.", (stack, i)
            pairs += _attn_pairs(f"{p}0.SelfAttention", (*b, "attn"), m)
            pairs.append((f"{p}0.layer_norm.weight", (*b, "attn_norm", "scale"), same, same))
            if stack == "decoder":
                pairs += _attn_pairs(f"{p}1.EncDecAttention", (*b, "cross"), m)
                pairs.append((f"{p}1.layer_norm.weight", (*b, "cross_norm", "scale"), same, same))
            f = 2 if stack == "decoder" else 1
            pairs += mlp(f"{p}{f}.DenseReluDense", (*b, "mlp"))
            pairs.append((f"{p}{f}.layer_norm.weight", (*b, "mlp_norm", "scale"), same, same))
    return pairs


def _stack(flat: dict[Path, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """``(stack, i, *rest)`` -> ``(stack, *rest)`` stacked over i (the scanned layout)."""
    out = {k: v for k, v in flat.items() if k[0] not in ("encoder", "decoder")}
    for stack, layers in (("encoder", m.num_encoder_layers), ("decoder", m.num_layers)):
        for rest in {k[2:] for k in flat if k[0] == stack}:
            out[(stack, *rest)] = np.stack([flat[(stack, i, *rest)] for i in range(layers)])
    return out


def _unstack(flat: dict[Path, np.ndarray], m: ModelConfig) -> dict[Path, np.ndarray]:
    """The inverse of :func:`_stack`."""
    out = {k: v for k, v in flat.items() if k[0] not in ("encoder", "decoder")}
    for key, value in flat.items():
        if key[0] in ("encoder", "decoder"):
            out.update({(key[0], i, *key[1:]): value[i] for i in range(value.shape[0])})
    return out


# Names that hold no parameter of their own: copies of the shared embedding.
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def jax_state_from_hf_t5(state_dict: Mapping[str, Any], cfg: Any) -> dict:
    """A nested pure dict of T5 parameters from a HF state dict; checks names and shapes."""
    m = _model_config(cfg)
    pairs = _pairs(m)
    missing = [hf for hf, *_ in pairs if hf not in state_dict]
    if missing:
        raise KeyError(f"Hugging Face T5 state dict lacks {missing[:8]}")
    ignorable = set(_ALIASES) | ({"lm_head.weight"} if m.tie_embeddings else set())
    # transformers' decoder cross-attention never has a bias table, old checkpoints do.
    ignorable.add("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
    unused = sorted(set(state_dict) - {hf for hf, *_ in pairs} - ignorable)
    if unused:
        raise ValueError(f"Hugging Face weights jaxformer has no place for: {unused[:8]}")
    flat = {ours: to(_to_numpy(state_dict[hf])) for hf, ours, to, _ in pairs}
    flat = _stack(flat, m)
    abstract = nnx.eval_shape(lambda: T5(m, nnx.Rngs(0)))
    expected = _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    if set(expected) != set(flat):
        lack = sorted(map(_name, set(expected) - set(flat)))
        extra = sorted(map(_name, set(flat) - set(expected)))
        raise ValueError(f"parameter names differ: model lacks {extra}, mapping lacks {lack}")
    for path, spec in expected.items():
        if flat[path].shape != spec.shape:
            raise ValueError(
                f"'{_name(path)}' has shape {flat[path].shape} in the Hugging Face weights "
                f"but {spec.shape} in the jaxformer config"
            )
        flat[path] = flat[path].astype(spec.dtype, copy=False)
    return _nest(flat)


def import_hf_t5(source: Any, cfg: Any = None, *, seed: int = 0) -> T5:
    """A :class:`T5` holding the weights of a transformers T5 model or state dict.

    ``cfg`` (a full config, its model section or a ModelConfig) defaults to
    ``config_from_hf_t5(source.config)``; a bare state dict needs it.
    """
    if cfg is None:
        if getattr(source, "config", None) is None:
            raise ValueError("import_hf_t5 needs cfg when given a bare state dict")
        cfg = config_from_hf_t5(source.config)
    m = _model_config(cfg)
    state_dict = source.state_dict() if hasattr(source, "state_dict") else source
    pure = jax_state_from_hf_t5(state_dict, m)
    abstract = nnx.eval_shape(lambda: T5(m, nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def hf_t5_state_dict(model: T5) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names, as numpy arrays (no torch needed)."""
    m = model.cfg
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = _unstack({k: np.asarray(jax.device_get(v)) for k, v in _flatten(pure).items()}, m)
    out = {hf: np.ascontiguousarray(back(flat[ours])) for hf, ours, _, back in _pairs(m)}
    for alias in _ALIASES:
        out[alias] = out["shared.weight"]
    if m.tie_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    return out


def export_hf_t5(model: T5, cfg: Any = None, *, attn_implementation: str | None = None) -> Any:
    """The model as an eval-mode transformers ``T5ForConditionalGeneration`` (float32)."""
    import torch
    import transformers

    m = model.cfg
    if cfg is not None and _model_config(cfg) != m:
        raise ValueError("cfg does not describe the model being exported")
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    hf_model = transformers.T5ForConditionalGeneration(hf_t5_config(m, **kwargs))
    tensors = {
        k: torch.from_numpy(np.require(v, np.float32, ["C", "W"]))
        for k, v in hf_t5_state_dict(model).items()
    }
    if not m.tie_embeddings:
        # transformers ties T5's head regardless of the config: untie it, and drop it from
        # the tied keys so save_pretrained writes it.
        hf_model.lm_head.weight = torch.nn.Parameter(tensors["lm_head.weight"].clone())
        tied = getattr(hf_model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied.pop("lm_head.weight", None)
    hf_model.load_state_dict(tensors, strict=True)
    return hf_model.eval()


__all__ = [
    "config_from_hf_t5",
    "export_hf_t5",
    "hf_t5_config",
    "hf_t5_state_dict",
    "import_hf_t5",
    "jax_state_from_hf_t5",
]
