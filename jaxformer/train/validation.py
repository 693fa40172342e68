"""``validate``: every feature's checks of a config against the devices, before compiling.

Each feature owns its checks: the mesh (``parallel.mesh``), the model section
(``model.config``), the data section (``data.validation``), the family (its task),
pipeline parallelism (``parallel.pipeline_parallel``), the attention backend
(``attention.registry``) and, here, the train loop's batch arithmetic. Each raises a
ConfigError naming the key.
"""

from __future__ import annotations

import ml_collections

from jaxformer.attention import registry as attention_registry
from jaxformer.data.validation import validate_data
from jaxformer.errors import ConfigError
from jaxformer.model.config import validate_model
from jaxformer.parallel import mesh as mesh_lib
from jaxformer.parallel import pipeline_parallel
from jaxformer.parallel.sharding import batch_axes, batch_shards
from jaxformer.tasks import task_for


def validate(
    cfg: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, num_slices: int = 1
) -> dict[str, int]:
    """Runs every feature's validator; returns the resolved mesh shape (ICI x DCN)."""
    mesh = mesh_lib.validate_mesh(cfg, num_devices, process_count, num_slices)
    task = task_for(cfg)
    validate_model(cfg)
    validate_data(cfg)
    task.validate(cfg, mesh)
    pipeline_parallel.validate(cfg, mesh, pipelines=task.pipelines)
    mesh_lib.check_layout(cfg, mesh)
    attention_registry.validate(cfg, mesh, causal_lm=task.causal_lm)
    validate_train(cfg, mesh, process_count)
    return mesh


def validate_train(
    cfg: ml_collections.ConfigDict, mesh: dict[str, int], process_count: int
) -> None:
    """The train loop's own checks: a batch that divides over the data-like axes, the
    microbatches and the processes, a positive step count, a loss chunk that divides the
    sequence, and non-negative bad-step guard settings."""
    t = cfg.train
    shards, data_like = batch_shards(mesh), " x ".join(batch_axes())
    if t.microbatches < 1:
        raise ConfigError(f"config key 'train.microbatches' must be >= 1, got {t.microbatches}")
    for divisor, what in (
        (
            shards * t.microbatches,
            f"{data_like} = {shards} devices times train.microbatches = {t.microbatches}",
        ),
        (process_count, f"{process_count} processes"),
    ):
        if t.global_batch % divisor:
            raise ConfigError(
                f"config key 'train.global_batch' ({t.global_batch}) does not divide over {what}"
            )
    if t.steps < 1:
        raise ConfigError(f"config key 'train.steps' must be >= 1, got {t.steps}")
    if t.loss_chunk and (t.loss_chunk < 0 or cfg.data.seq_len % t.loss_chunk):
        raise ConfigError(
            f"config key 'train.loss_chunk' ({t.loss_chunk}) must divide "
            f"data.seq_len ({cfg.data.seq_len})"
        )
    for key in ("max_bad_steps", "spike_sigma", "spike_warmup"):
        if t[key] < 0:
            raise ConfigError(f"config key 'train.{key}' must be >= 0, got {t[key]}")
