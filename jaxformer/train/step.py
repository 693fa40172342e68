"""The train state, its sharded creation, and the pure train and eval steps."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer import parallel, tasks
from jaxformer.losses import cross_entropy
from jaxformer.parallel import pipeline_parallel
from jaxformer.tasks import Task, task_for
from jaxformer.train import guard as guard_lib
from jaxformer.train.optim import make_schedule

Batch = dict[str, jax.Array]

# Summed statistics that the train step divides by the batch's token weight.
STAT_KEYS = ("weight", "nll", "correct")
MOE_STAT_KEYS = ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction")


def _stat_keys(cfg: Any, batch: Batch) -> tuple[str, ...]:
    heads = tuple(f"{h}_{k}" for h in head_names(batch) for k in STAT_KEYS)
    return STAT_KEYS + (MOE_STAT_KEYS if cfg.model.moe_experts > 0 else ()) + heads


def head_names(tree: dict[str, Any]) -> list[str]:
    """Sentence-level heads named by a batch (``NAME_targets``) or by stats (``NAME_weight``)."""
    return [k.rsplit("_", 1)[0] for k in tree if k.endswith(("_targets", "_weight"))]


def head_stats(aux: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
    """Summed statistics of each sentence-level head (BERT's NSP): ``aux["heads"][NAME]``
    are ``[B, 1, C]`` logits scored against ``batch["NAME_targets"]`` and
    ``batch["NAME_weights"]`` (``[B, 1]``); keys are ``NAME_weight``, ``NAME_nll``..."""
    stats = {}
    for name, logits_Bx1xC in aux.get("heads", {}).items():
        _, head = cross_entropy(logits_Bx1xC, batch[f"{name}_targets"], batch[f"{name}_weights"])
        stats |= {f"{name}_{k}": v for k, v in head.items()}
    return stats


def head_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """``NAME_loss`` and ``NAME_accuracy`` of each head from summed statistics."""
    out = {}
    for name in head_names(stats):
        weight = jnp.maximum(stats[f"{name}_weight"], 1.0)
        out[f"{name}_loss"] = stats[f"{name}_nll"] / weight
        out[f"{name}_accuracy"] = stats[f"{name}_correct"] / weight
    return out


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes; with the data iterator, everything a checkpoint holds."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so Orbax stores it as a plain array
    guard: guard_lib.Guard  # bad-step counters and loss statistics (train/guard.py)


def build_model(cfg: Any, seed: int, mesh_shape: Any = None) -> nnx.Module:
    """The config's model, through its task, with the attention backend chosen for the
    mesh (ring attention in front only where ``mesh.sequence > 1``)."""
    sequence_parallel = True if mesh_shape is None else mesh_shape.get("sequence", 1) > 1
    return tasks.build_model(cfg.model, seed, sequence_parallel=sequence_parallel)


def init_state(
    cfg: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: parallel.sharding.Rules
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Creates the train state already sharded: shapes from ``eval_shape``, values from a
    ``jit`` whose ``out_shardings`` place each parameter, so none is ever whole on one device.

    Returns the model's graphdef, the state and the state's shardings.
    """
    graphdef, _, shardings = abstract_state(cfg, tx, mesh, rules)
    build = functools.partial(_build_state, cfg, tx, dict(mesh.shape))
    state = jax.jit(build, out_shardings=shardings)()
    return graphdef, state, shardings


def _build_state(cfg: Any, tx: optax.GradientTransformation, mesh_shape: Any) -> TrainState:
    seed = cfg.train.seed
    params = nnx.state(build_model(cfg, seed, mesh_shape))
    rng = jax.random.key_data(jax.random.key(seed + 1))
    return TrainState(
        jnp.zeros((), jnp.int32), params, tx.init(params), rng, guard_lib.init_guard()
    )


def abstract_state(
    cfg: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: parallel.sharding.Rules
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """The train state as ``ShapeDtypeStruct``s carrying their shardings, allocating nothing:
    what ``init_state`` would create, for lowering and compiling against (``jaxformer plan``).

    Returns the model's graphdef, the abstract state and the state's shardings.
    """
    mesh_shape = dict(mesh.shape)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, cfg.train.seed, mesh_shape)))
    shapes = jax.eval_shape(functools.partial(_build_state, cfg, tx, mesh_shape))
    shardings = parallel.tree_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return graphdef, abstract, shardings


def _token_loss(
    cfg: Any, logits: jax.Array, batch: Batch, *, in_pipeline: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The summed token loss and statistics of a batch's logits (label smoothing, z-loss).
    Inside a pipeline stage the target logits are selected without a gather (see
    ``cross_entropy``'s ``select_by_mask``)."""
    return cross_entropy(
        logits,
        batch["targets"],
        batch["weights"],
        label_smoothing=cfg.train.label_smoothing,
        z_loss=cfg.train.z_loss,
        select_by_mask=in_pipeline,
    )


def _loss_and_grads(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Batch,
    key: jax.Array | None,
    cfg: Any,
    task: Task | None = None,
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
    """The summed loss of the task's token loss (default: the config's task),
    sentence-level heads and MoE terms, and its gradients."""
    task = task_for(cfg) if task is None else task

    def loss_fn(p: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
        model = nnx.merge(graphdef, p)
        loss, stats, aux = task.token_loss(model, batch, key, cfg.train)
        stats |= head_stats(aux, batch)
        for name in head_names(batch):
            # Each head's mean, given the batch's token weight: the step's one division by
            # the total weight then leaves the sum of means that BERT trains (MLM + NSP).
            head_weight = jnp.maximum(stats[f"{name}_weight"], 1.0)
            loss = loss + stats[f"{name}_nll"] / head_weight * stats["weight"]
        if "aux_loss" in aux:
            # The loss is a token sum divided later by the total token weight: scaling the
            # (per-token mean) MoE terms by this batch's weight gives them their own weight.
            weight = stats["weight"]
            loss = loss + (aux["aux_loss"] + aux["z_loss"]) * weight
            for name in ("aux_loss", "z_loss", "dropped_fraction"):
                stats[f"moe_{name}"] = aux[name] * weight
        return loss, stats

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _microbatched(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...] taking every n-th row, so each device keeps its own rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch, accumulating over ``train.microbatches``;
    not applied (but counted) when the guard judges it bad (train/guard.py)."""
    key = None
    if cfg.model.dropout > 0:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    n = cfg.train.microbatches
    task = task_for(cfg)
    stages = pipeline_parallel.stages()
    if stages > 1:  # the pipeline runs the microbatches and computes gradients
        (loss_sum, stats), grads = pipeline_parallel.loss_and_grads(
            stage_graphdef(cfg, stages), state.params, _microbatched(batch, n), key, cfg,
            functools.partial(_token_loss, cfg, in_pipeline=True),
        )  # fmt: skip
    elif n == 1:
        (loss_sum, stats), grads = _loss_and_grads(graphdef, state.params, batch, key, cfg, task)
    else:

        def accumulate(carry: Any, xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
            mb, i = xs
            mb_key = None if key is None else jax.random.fold_in(key, i)
            (loss, stats), grads = _loss_and_grads(graphdef, state.params, mb, mb_key, cfg, task)
            return jax.tree.map(jnp.add, carry, (loss, stats, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (jnp.zeros(()), {k: jnp.zeros(()) for k in _stat_keys(cfg, batch)}, zeros)
        (loss_sum, stats, grads), _ = jax.lax.scan(
            accumulate, init, (_microbatched(batch, n), jnp.arange(n))
        )
    weight = jnp.maximum(stats["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok, guard = guard_lib.judge(cfg.train, state.guard, loss_sum / weight, grad_norm)
    params, opt_state = guard_lib.keep_if(ok, (params, opt_state), (state.params, state.opt_state))
    schedule = make_schedule(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    metrics = {
        "loss": loss_sum / weight,
        "nll": stats["nll"] / weight,
        "accuracy": stats["correct"] / weight,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": stats["weight"],
    } | guard_lib.metrics(ok, guard)
    if cfg.model.moe_experts > 0:
        metrics.update({name: stats[name] / weight for name in MOE_STAT_KEYS})
    metrics.update(head_metrics(stats))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, guard=guard)
    return new_state, metrics


def eval_step(
    params: nnx.State, batch: Batch, *, graphdef: nnx.GraphDef, cfg: Any
) -> dict[str, jax.Array]:
    """Summed held-out statistics of one batch (no dropout, no smoothing)."""
    model = nnx.merge(graphdef, params)
    stats, aux = task_for(cfg).eval_stats(model, batch, cfg.train)
    return stats | head_stats(aux, batch)


def stage_graphdef(cfg: Any, stages: int) -> nnx.GraphDef:
    """The graphdef of the model holding one pipeline stage's num_layers / stages layers:
    merging a stage's slice of the stacked layers into it runs exactly those layers."""
    stage_cfg = ml_collections.ConfigDict(cfg.to_dict())
    stage_cfg.model.num_layers = cfg.model.num_layers // stages
    return nnx.graphdef(nnx.eval_shape(lambda: build_model(stage_cfg, 0, {"sequence": 1})))


def _with_mesh(fn: Any, mesh: Mesh, rules: parallel.sharding.Rules) -> Any:
    """``fn`` traced with the mesh active, so the model's logical constraints apply."""

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        with parallel.activate(mesh, rules):
            return fn(*args)

    return wrapped


def jit_eval(
    cfg: Any,
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    rules: parallel.sharding.Rules,
    param_shardings: Any = None,
) -> Any:
    """The eval step compiled for the mesh: ``(params, batch) -> summed statistics``;
    ``param_shardings`` None takes the parameters' own (restored) shardings."""
    data = parallel.batch_sharding(mesh, rules)
    return jax.jit(
        _with_mesh(functools.partial(eval_step, graphdef=graphdef, cfg=cfg), mesh, rules),
        in_shardings=(param_shardings, data),
    )


def jit_steps(
    cfg: Any,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: parallel.sharding.Rules,
    state_shardings: Any,
) -> tuple[Any, Any]:
    """The train and eval steps compiled for the mesh; the train step donates its state."""
    data = parallel.batch_sharding(mesh, rules)
    train = jax.jit(
        _with_mesh(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg), mesh, rules),
        in_shardings=(state_shardings, data),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    return train, jit_eval(cfg, graphdef, mesh, rules, state_shardings.params)
