"""Model families as task objects (``base.Task``), found by ``model.family`` in the registry.

Everything that differs between families (model class, dataset, batch layout, loss,
evaluation, generation, FLOPs, the keys it honours) is asked of the config's task.
"""

from typing import Any

from jaxformer.attention import registry as attention_registry
from jaxformer.flops import FlopCount
from jaxformer.model import ModelConfig
from jaxformer.tasks.base import Task
from jaxformer.tasks.registry import TASKS, register, task_for


def build_model(model_cfg: Any, seed: int, *, sequence_parallel: bool = True) -> Any:
    """The model a config's ``model`` section describes, with its attention backend
    selected (``jaxformer.attention.registry.select``) and parameters from ``seed``."""
    attention = attention_registry.select(model_cfg, sequence_parallel=sequence_parallel)
    return task_for(model_cfg).build_model(model_cfg, seed, attention)


def model_config(model_cfg: Any, *, sequence_parallel: bool = True) -> ModelConfig:
    """``ModelConfig.from_config`` with the attention backend ``model.attention_impl``
    selects: for code that builds a family's model class itself."""
    attention = attention_registry.select(model_cfg, sequence_parallel=sequence_parallel)
    return ModelConfig.from_config(model_cfg, attention)


def count_flops(model_cfg: Any, seq_len: int) -> FlopCount:
    """Parameters and training FLOPs per token of the config's model (jaxformer/flops.py)."""
    return task_for(model_cfg).count_flops(model_cfg, seq_len)


__all__ = ["TASKS", "Task", "build_model", "count_flops", "model_config", "register", "task_for"]
