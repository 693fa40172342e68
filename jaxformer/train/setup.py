"""The one setup path: from a config to a mesh, an optimizer, a model and its state.

Every command that needs a model goes through here: ``jaxformer train`` and ``eval``,
``generate``, ``plan``, and the tools (benchmark, hf_convert, collectives). So each gets
the same validation (with the DCN and slice sizes), the same mesh and the same
shardings. ``restore_params`` reads parameters only: eval and generate never build or
read optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer import parallel
from jaxformer.errors import ConfigError
from jaxformer.parallel import distributed
from jaxformer.tasks import Task, task_for
from jaxformer.train.checkpoint import Checkpointer, abstract_like
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import TrainState, abstract_state, build_model, init_state
from jaxformer.train.validation import validate


@dataclasses.dataclass
class Built:
    """A config set up on a mesh: the train state (arrays, or abstract ``ShapeDtypeStruct``s
    carrying their shardings) and everything it was made with."""

    cfg: ml_collections.ConfigDict
    task: Task
    mesh: Mesh
    mesh_shape: dict[str, int]  # ICI x DCN size of every axis
    dcn_shape: dict[str, int]
    rules: parallel.sharding.Rules
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    state: TrainState
    shardings: Any


RunMesh = tuple[Mesh, dict[str, int], dict[str, int]]  # the mesh, its shape, its DCN sizes


def make_run_mesh(
    cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> RunMesh:
    """Validates ``cfg`` for ``devices`` (default: all) and builds their mesh; returns it
    with the resolved shape (ICI x DCN) and the DCN sizes."""
    devices = list(jax.devices() if devices is None else devices)
    processes = jax.process_count()
    mesh_shape = validate(cfg, len(devices), processes, distributed.num_slices(devices))
    _, dcn_shape = parallel.resolve_mesh(cfg.mesh, len(devices))
    return parallel.make_mesh(mesh_shape, devices, dcn=dcn_shape), mesh_shape, dcn_shape


def build(
    cfg: ml_collections.ConfigDict,
    *,
    rules: parallel.sharding.Rules | None = None,
    devices: Sequence[jax.Device] | None = None,
    abstract: bool = False,
    run_mesh: RunMesh | None = None,
) -> Built:
    """validate -> mesh -> optimizer -> the train state, created already sharded (or, with
    ``abstract``, as shapes only: what ``jaxformer plan`` compiles against). ``run_mesh``
    is :func:`make_run_mesh`'s result where the caller validated first (``train``, which
    opens its data in between)."""
    rules = parallel.DEFAULT_RULES if rules is None else rules
    mesh, mesh_shape, dcn_shape = run_mesh or make_run_mesh(cfg, devices)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    make = abstract_state if abstract else init_state
    graphdef, state, shardings = make(cfg, tx, mesh, rules)
    task = task_for(cfg)
    return Built(cfg, task, mesh, mesh_shape, dcn_shape, rules, tx, graphdef, state, shardings)


def abstract_params(
    cfg: ml_collections.ConfigDict, mesh: Mesh, rules: parallel.sharding.Rules
) -> tuple[nnx.GraphDef, Any]:
    """The model's graphdef and its parameters as ``ShapeDtypeStruct``s with their
    shardings on ``mesh``: no optimizer state, nothing allocated."""
    shape = dict(mesh.shape)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, cfg.train.seed, shape)))
    shardings = parallel.tree_shardings(params, mesh, rules)
    return graphdef, abstract_like(params, shardings)


def restore_params(
    cfg: ml_collections.ConfigDict, rules: parallel.sharding.Rules | None = None
) -> tuple[nnx.Module, int, Mesh]:
    """The model of the latest checkpoint in ``cfg.train.run_dir``, its step and its mesh,
    reading parameters only (no optimizer state is built or read).

    It opens no dataset and writes nothing into the run directory. Raises ConfigError
    naming ``train.run_dir`` when there is no checkpoint.
    """
    rules = parallel.DEFAULT_RULES if rules is None else rules
    mesh, _, _ = make_run_mesh(cfg)
    directory = Path(cfg.train.run_dir) / "checkpoints"
    missing = ConfigError(f"no checkpoint in '{cfg.train.run_dir}' (train.run_dir)")
    if not directory.is_dir():  # checked first: the checkpointer would create it
        raise missing
    checkpointer = Checkpointer(
        directory, keep=cfg.train.keep_checkpoints, every=0, use_async=False
    )
    try:
        if checkpointer.latest_step() is None:
            raise missing
        graphdef, params = abstract_params(cfg, mesh, rules)
        restored = checkpointer.restore_latest(params, params_only=True)
        if restored is None:
            raise missing
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, restored.state), restored.step, mesh
