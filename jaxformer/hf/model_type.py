"""A Hugging Face model type (config.json's ``model_type``: ``gpt2``, ``llama``, ``bert``,
``t5``) as a checkpoint directory needs it, and how a jaxformer config is compared with
the one a checkpoint derives.

:class:`HFModelType` is what :mod:`jaxformer.hf.registry` lists for checkpoint
directories; each names the jaxformer task (:class:`jaxformer.tasks.Task`, the config's
``model.family``) its checkpoints become, so a config of another family is told apart by
its task (:func:`jaxformer.tasks.task_for`), never by comparing names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxformer.hf.common import model_config
from jaxformer.model import ModelConfig
from jaxformer.tasks import Task, task_for


@dataclasses.dataclass(frozen=True)
class HFModelType:
    """A Hugging Face model type as a checkpoint directory needs it.

    ``name`` is config.json's ``model_type``; ``task`` the jaxformer task (the config's
    ``model.family``) its checkpoints become. ``config_from_hf(hf_config, shapes)`` gives
    a full jaxformer config from config.json (``shapes``: ``{tensor: shape}`` of the
    files, for what config.json does not say, such as a classifier's labels).
    ``arch_keys`` are the model keys that change what the weights compute (a config
    lacking one reads it from ``defaults``). ``import_state(state_dict, cfg, seed)`` runs
    the model type's map; ``export(model)`` gives config.json's fields and the tensors to
    write (no aliases), after refusing a model the model type cannot hold;
    ``config_to_hf(cfg)`` the fields alone, checked the same way, for a jaxformer config.
    """

    name: str
    task: Task
    config_from_hf: Callable[[Mapping[str, Any], Mapping[str, tuple[int, ...]]], Any]
    arch_keys: tuple[str, ...]
    import_state: Callable[[Mapping[str, Any], Any, int], nnx.Module]
    export: Callable[[nnx.Module], tuple[dict[str, Any], dict[str, np.ndarray]]]
    config_to_hf: Callable[[Any], dict[str, Any]]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _section(cfg: Any) -> Any:
    """The model section of a full config or of the section itself. A ModelConfig is
    refused: the comparison starts from the config's task, which a config names."""
    if isinstance(cfg, ModelConfig):
        raise TypeError(
            "compare a full jaxformer config or its model section with a checkpoint's, "
            "not a ModelConfig"
        )
    return cfg.get("model", cfg)


def _model_values(section: Any, keys: Sequence[str], defaults: Mapping[str, Any]) -> dict:
    """The model section's ``keys``, defaults resolved as the model resolves them
    (``head_dim`` 0 is ``d_model / num_heads`` ...); keys ModelConfig has no field for
    (``num_labels``) are read from the section (from ``defaults`` when it lacks them)."""
    resolved = model_config(section)
    out = {}
    for k in keys:
        if hasattr(resolved, k):
            out[k] = getattr(resolved, k)
        else:
            out[k] = section.get(k, defaults.get(k))
    return out


def config_differences(
    cfg: Any, derived: Any, model_type: HFModelType
) -> dict[str, tuple[Any, Any]]:
    """``{key: (cfg's value, derived value)}`` of the model keys that change what the
    weights compute and differ between a jaxformer config (full, or its model section)
    and one derived from a ``model_type`` checkpoint. A config of another task than the
    model type's differs in ``model.family`` alone (and so in everything)."""
    section = _section(cfg)
    ours, theirs = task_for(section), model_type.task
    if ours is not theirs:
        return {"family": (ours.name, theirs.name)}
    keys = model_type.arch_keys
    have = _model_values(section, keys, model_type.defaults)
    want = _model_values(_section(derived), keys, model_type.defaults)
    return {k: (have[k], want[k]) for k in keys if have[k] != want[k]}


def derived_overrides(cfg: Any, derived: Any, model_type: HFModelType) -> list[str]:
    """``--config.model.KEY=VALUE`` arguments that make ``cfg``'s model the checkpoint's
    (the derived config's own values, unresolved, so they read as a user would write)."""
    section = derived.model
    out = []
    for key in config_differences(cfg, derived, model_type):
        value = section[key] if key in section else model_type.defaults.get(key)
        out.append(f"--config.model.{key}={value}")
    return out


__all__ = ["HFModelType", "config_differences", "derived_overrides"]
