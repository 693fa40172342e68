"""``model.family`` -> its task: the one place that reads the family's name.

Adding a family is one file (a :class:`~jaxformer.tasks.base.Task` subclass and its
model) plus one line here, or one :func:`register` call (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from jaxformer.errors import ConfigError
from jaxformer.tasks.base import Task
from jaxformer.tasks.bert import BERT
from jaxformer.tasks.decoder_lm import DECODER_LM
from jaxformer.tasks.encoder_decoder import ENCODER_DECODER
from jaxformer.tasks.t5 import T5_SPAN_CORRUPTION

TASKS: dict[str, Task] = {
    task.name: task for task in (DECODER_LM, ENCODER_DECODER, BERT, T5_SPAN_CORRUPTION)
}


def register(task: Task) -> Task:
    """Adds a family (tests register a toy one); returns it."""
    TASKS[task.name] = task
    return task


def task_for(cfg: Any) -> Task:
    """The task of a config, or of its model section (``cfg.model``)."""
    model_cfg = cfg.model if "model" in cfg else cfg
    family = model_cfg.family
    if family not in TASKS:
        raise ConfigError(f"config key 'model.family' is {family!r}; choose one of {list(TASKS)}")
    return TASKS[family]
