"""What every model type module shares: reading config fields, and the configuration
checks run both ways.

A Hugging Face config and a jaxformer model config describe the same function only if
every setting that changes what the weights compute agrees; shapes alone cannot tell
(eps, RoPE base, attention scaling, tying are not in the weights). Each model type module
(:mod:`~jaxformer.hf.decoder` for ``gpt2`` and ``llama``, :mod:`~jaxformer.hf.bert`,
:mod:`~jaxformer.hf.t5`) therefore declares its ``ARCH_KEYS`` (the jaxformer ``model.*``
keys that matter for it) and checks:

- on import, the Hugging Face fields it cannot reproduce (raising ValueError naming the
  field), and a given jaxformer config against the one derived from the Hugging Face
  config (:func:`check_same_model`, naming ``model.KEY``);
- on export, the jaxformer settings the model type has no field for
  (:func:`check_supported`) and that the Hugging Face config written reads back as the
  same model (:func:`check_round_trip`), so a key no field carries is refused, not
  dropped.

What a checkpoint directory needs of a model type is :mod:`jaxformer.hf.model_type`'s
:class:`~jaxformer.hf.model_type.HFModelType`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxformer import tasks
from jaxformer.model import ModelConfig


def get(hf_config: Any, name: str, default: Any = None) -> Any:
    """Reads a field from a transformers config object or a config.json dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def need(hf_config: Any, name: str) -> Any:
    """A field the conversion cannot guess."""
    value = get(hf_config, name)
    if value is None:
        raise ValueError(f"Hugging Face config has no '{name}'")
    return value


def model_config(cfg: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig (as it is), a full config, or its model section:
    for a config, with the attention backend its ``model.attention_impl`` selects
    (:func:`jaxformer.tasks.model_config`), so a model built from it runs that backend."""
    if isinstance(cfg, ModelConfig):
        return cfg
    return tasks.model_config(cfg.get("model", cfg))


def _value(m: Any, key: str, defaults: Mapping[str, Any]) -> Any:
    """``m.key``; a key ``m`` lacks (one another change has not added yet) reads as its
    default."""
    return getattr(m, key, defaults.get(key))


def _settings(values: Mapping[str, Any]) -> str:
    return ", ".join(f"model.{k}={v!r}" for k, v in values.items())


def check_supported(m: ModelConfig, want: Mapping[str, Any], model_type: str) -> None:
    """Raises unless ``m`` has every value of ``want``: what a Hugging Face ``model_type``
    model can hold. A key ``m`` lacks counts as its value in ``want``."""
    wrong = {k: _value(m, k, want) for k, v in want.items() if _value(m, k, want) != v}
    if wrong:
        needed = {k: want[k] for k in wrong}
        raise ValueError(
            f"a jaxformer model with {_settings(wrong)} has no Hugging Face {model_type} "
            f"equivalent; {model_type} needs {_settings(needed)}"
        )


def check_same_model(
    have: ModelConfig,
    want: ModelConfig,
    keys: Sequence[str],
    what: str,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raises if ``have`` computes something else than ``want``: eps, RoPE base and the
    like are not in the weights, so shapes alone cannot tell. ``keys`` are the config
    keys that matter; one a config lacks reads as its value in ``defaults``."""
    defaults = defaults or {}
    pairs = {k: (_value(have, k, defaults), _value(want, k, defaults)) for k in keys}
    wrong = {k: (a, b) for k, (a, b) in pairs.items() if a != b}
    if wrong:
        detail = ", ".join(f"model.{k}={a!r} ({what}: {b!r})" for k, (a, b) in wrong.items())
        raise ValueError(f"config does not match the {what}: {detail}")


def check_round_trip(
    m: ModelConfig,
    written: Any,
    keys: Sequence[str],
    model_type: str,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raises if the Hugging Face config exported for ``m``, read back (``written``: the
    jaxformer config derived from it), is another model: a setting the model type has
    no field for would otherwise be dropped from the export without a word."""
    back, defaults = model_config(written), defaults or {}
    pairs = {k: (_value(m, k, defaults), _value(back, k, defaults)) for k in keys}
    wrong = {k: (a, b) for k, (a, b) in pairs.items() if a != b}
    if wrong:
        ours = _settings({k: a for k, (a, _) in wrong.items()})
        theirs = _settings({k: b for k, (_, b) in wrong.items()})
        raise ValueError(
            f"a jaxformer model with {ours} has no Hugging Face {model_type} equivalent: "
            f"the {model_type} config it would export as reads back as {theirs}"
        )


def read_source(
    source: Any, cfg: Any, config_from_hf: Callable[[Any], Any], caller: str
) -> tuple[ModelConfig, Mapping[str, Any], ModelConfig | None]:
    """``(model config, state dict, the model config the source's own Hugging Face config
    derives, or None)`` of an import's source: a transformers model, or a state dict
    (then ``cfg`` is required). ``cfg`` defaults to ``config_from_hf(source.config)``,
    which refuses a Hugging Face config it cannot reproduce, ``cfg`` given or not."""
    hf_cfg = getattr(source, "config", None)
    derived = None if hf_cfg is None else model_config(config_from_hf(hf_cfg))
    if cfg is None:
        if derived is None:
            raise ValueError(f"{caller} needs cfg when given a bare state dict")
        cfg = derived
    state_dict = source.state_dict() if hasattr(source, "state_dict") else source
    return model_config(cfg), state_dict, derived


def with_prefix(state_dict: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """The names of a headless model (GPT2Model, BertModel ...) under its LM's prefix."""
    if any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {prefix + k: v for k, v in state_dict.items()}


def config_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """Keyword arguments for a transformers config class."""
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


__all__ = [
    "check_round_trip",
    "check_same_model",
    "check_supported",
    "config_kwargs",
    "get",
    "model_config",
    "need",
    "read_source",
    "with_prefix",
]
