"""Pipeline parallelism over the ``stage`` mesh axis: GPipe and 1F1B schedules.

The decoder's scanned blocks are stacked on a ``layers`` axis, which the rules table splits
over ``stage``: stage s holds layers [s N/S, (s+1) N/S). The batch is split into M
microbatches. A ``shard_map`` over ``stage`` alone (``data``, ``fsdp``, ``tensor``... stay
with the automatic partitioner) runs each stage's layers on one microbatch at a time and
passes activations to the next stage, and cotangents to the previous one, with
``jax.lax.ppermute``. The token embedding runs on the first stage and the final norm,
logits and loss on the last (``lax.cond`` on the stage index, so the other stages skip
them); their parameters are replicated over ``stage`` and their gradients summed over it
once per step.

- **GPipe**: every microbatch forward through the pipeline (M + S - 1 ticks), then
  ``jax.value_and_grad`` differentiates that loop, which runs it backwards. Autodiff keeps
  the residuals of every tick, so activation memory grows with M.
- **1F1B** (PipeDream-Flush): an explicit schedule of 2 (M + S - 1) slots. In slot u,
  stage s runs the forward of microbatch (u - s) / 2 when u - s is even and the backward
  of microbatch (u - 2S + 1 + s) / 2 otherwise (when those exist), so in steady state each
  stage alternates one forward and one backward. The forward keeps only its stage input;
  the backward recomputes the stage under ``jax.vjp`` and applies the cotangent that
  arrived from the next stage (the loss's, on the last). Stage s holds at most S - s
  inputs, whatever M: activation memory is bounded by the number of stages.

Both leave (S - 1) / (M + S - 1) of each stage's time idle (the bubble). 1F1B buys its
memory with time: the backward recomputes the forward, and in lockstep SPMD a slot lasts as
long as a backward even for the stages running a forward (docs/parallelism.md, stage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec

from jaxformer.errors import ConfigError
from jaxformer.parallel.sharding import _ACTIVE, activate

STAGE = "stage"

Batch = dict[str, jax.Array]
Stats = dict[str, jax.Array]
# (logits [B, L, V], microbatch) -> (summed loss, summed statistics): the train step's loss.
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, Stats]]


def stages() -> int:
    """Pipeline stages of the active mesh (1 without one): the train step pipelines when >1."""
    active = _ACTIVE.get()
    return 1 if active is None else int(active[0].shape.get(STAGE, 1))


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of each stage's time spent idle in a GPipe or 1F1B step."""
    return (stages - 1) / (microbatches + stages - 1)


class StageModel(Protocol):
    """What a model offers pipeline stages (``DecoderLM`` does): its pieces, public, so
    that this module runs them without knowing the model's classes."""

    def embed_tokens(self, inputs_BxL: jax.Array, positions_BxL: jax.Array, key: Any) -> jax.Array:
        """Token (+ position) embedding: the first stage's input."""
        ...

    def stage_layers(
        self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, key: Any
    ) -> jax.Array:
        """Every layer this model holds (a stage's model holds num_layers / stages)."""
        ...

    def stage_head(self, y_BxLxD: jax.Array) -> jax.Array:
        """Final norm and float32 logits: the last stage's output."""
        ...


class _Stage:
    """One stage's pieces of the decoder, applied to microbatch ``m``."""

    def __init__(self, graphdef: nnx.GraphDef, loss_fn: LossFn, key: jax.Array | None, stages: int):
        self.graphdef, self.loss_fn, self.key, self.stages = graphdef, loss_fn, key, stages

    def _key(self, m: jax.Array, salt: jax.Array | int) -> jax.Array | None:
        """Dropout key of microbatch m for ``salt`` (a stage, or ``stages`` for the embedding):
        the same in a forward and in its recomputation."""
        if self.key is None:
            return None
        return jax.random.fold_in(jax.random.fold_in(self.key, m), salt)

    def embed(self, params: nnx.State, mb: Batch, m: jax.Array) -> jax.Array:
        model: StageModel = nnx.merge(self.graphdef, params)
        return model.embed_tokens(mb["inputs"], mb["positions"], self._key(m, self.stages))

    def blocks(
        self, params: nnx.State, x_BxLxD: jax.Array, mb: Batch, m: jax.Array, s: jax.Array
    ) -> jax.Array:
        model: StageModel = nnx.merge(self.graphdef, params)
        key = self._key(m, s)
        return model.stage_layers(x_BxLxD, mb["segment_ids"], mb["positions"], key)

    def head(self, params: nnx.State, y_BxLxD: jax.Array, mb: Batch) -> tuple[jax.Array, Stats]:
        model: StageModel = nnx.merge(self.graphdef, params)
        return self.loss_fn(model.stage_head(y_BxLxD), mb)

    def zero_head(self, params: nnx.State, y_BxLxD: jax.Array, mb: Batch) -> tuple:
        shapes = jax.eval_shape(self.head, params, y_BxLxD, mb)
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def forward(
        self,
        params: nnx.State,
        x_BxLxD: jax.Array,
        mb: Batch,
        m: jax.Array,
        s: jax.Array,
        valid: jax.Array | bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, Stats]]:
        """Stage s on microbatch m: its input (the embedding on the first stage), through its
        layers, then the loss on the last stage (zeros elsewhere, and for a ``valid=False``
        tick, which only fills the pipeline)."""
        x_BxLxD = jax.lax.cond(
            s == 0,
            lambda p, x: self.embed(p, mb, m).astype(x.dtype),
            lambda p, x: x,
            params,
            x_BxLxD,
        )
        y_BxLxD = self.blocks(params, x_BxLxD, mb, m, s)
        loss = jax.lax.cond(
            (s == self.stages - 1) & valid,
            lambda *a: _varying(self.head(*a)),
            lambda *a: _varying(self.zero_head(*a)),
            params,
            y_BxLxD,
            mb,
        )
        return y_BxLxD, loss


def _varying(tree: Any) -> Any:
    """Marks stage-replicated values as varying over ``stage`` inside the shard_map, so the
    per-stage computations and their gradients stay per stage (no implicit psum)."""

    def one(x: jax.Array) -> jax.Array:
        return x if STAGE in jax.typeof(x).mat.varying else jax.lax.pcast(x, STAGE, to="varying")

    return jax.tree.map(one, tree)


def _shift(x: Any, stages: int, step: int) -> Any:
    """Sends every stage's ``x`` to stage s + step (forward: +1, backward: -1)."""
    perm = [(i, i + step) for i in range(stages) if 0 <= i + step < stages]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, STAGE, perm), x)


def _index(tree: Any, m: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, keepdims=False), tree)


def _gpipe(
    stage: _Stage, params: nnx.State, mbs: Batch, x0_BxLxD: jax.Array
) -> tuple[jax.Array, Stats]:
    """Forward of every microbatch through the pipeline: the summed loss and statistics."""
    stages, num_mb = stage.stages, jax.tree.leaves(mbs)[0].shape[0]
    s = jax.lax.axis_index(STAGE)

    # Parameters travel in the carry: NNX transforms (the layer scan) need them traced
    # at the level they run in, not closed over.
    def tick(carry: Any, t: jax.Array) -> tuple[Any, None]:
        params, x_BxLxD, total = carry
        m = jnp.clip(t - s, 0, num_mb - 1)
        valid = (t - s >= 0) & (t - s < num_mb)
        y_BxLxD, loss = stage.forward(params, x_BxLxD, _index(mbs, m), m, s, valid)
        return (params, _shift(y_BxLxD, stages, 1), jax.tree.map(jnp.add, total, loss)), None

    total = _varying(stage.zero_head(params, x0_BxLxD, _index(mbs, 0)))
    init = (params, x0_BxLxD, total)
    (_, _, total), _ = jax.lax.scan(tick, init, jnp.arange(num_mb + stages - 1))
    # Ticks outside a stage's microbatches compute on clamped ones, but never reach the loss:
    # their outputs only feed other such ticks, and the last stage's are masked.
    return jax.lax.psum(total, STAGE)


def _one_f_one_b(
    stage: _Stage, params: nnx.State, mbs: Batch, x0_BxLxD: jax.Array
) -> tuple[tuple[jax.Array, Stats], nnx.State]:
    """The 1F1B schedule: summed loss and statistics, and this stage's gradients."""
    stages, num_mb = stage.stages, jax.tree.leaves(mbs)[0].shape[0]
    s = jax.lax.axis_index(STAGE)
    last = s == stages - 1

    def fwd(params: nnx.State, x_BxLxD: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The stage's input for microbatch m (kept for the backward) and its output."""
        mb = _index(mbs, m)
        x_BxLxD = jax.lax.cond(
            s == 0,
            lambda p, x: stage.embed(p, mb, m).astype(x.dtype),
            lambda p, x: x,
            params,
            x_BxLxD,
        )
        return x_BxLxD, stage.blocks(params, x_BxLxD, mb, m, s)

    def bwd(params: nnx.State, x_BxLxD: jax.Array, dy_BxLxD: jax.Array, m: jax.Array) -> tuple:
        """Recomputes the stage on its saved input under vjp and pulls back the cotangent
        from the next stage, or the loss's (1) on the last stage."""
        mb = _index(mbs, m)
        (_, loss), pull, stats = jax.vjp(
            lambda p, x: _split_stats(stage.forward(p, x, mb, m, s)), params, x_BxLxD,
            has_aux=True,
        )  # fmt: skip
        dy_BxLxD = jnp.where(last, jnp.zeros_like(dy_BxLxD), dy_BxLxD)
        dparams, dx_BxLxD = pull((dy_BxLxD, jnp.ones_like(loss)))
        return dparams, dx_BxLxD, (loss, stats)

    zeros_grads = jax.tree.map(jnp.zeros_like, params)
    zeros_loss = _varying(stage.zero_head(params, x0_BxLxD, _index(mbs, 0)))
    saved_SxBxLxD = jnp.zeros((stages, *x0_BxLxD.shape), x0_BxLxD.dtype)
    saved_SxBxLxD = _varying(saved_SxBxLxD)

    def slot(carry: Any, u: jax.Array) -> tuple[Any, None]:
        params, x_recv, dy_recv, saved_SxBxLxD, grads, total = carry
        f, b = u - s, u - (2 * stages - 1 - s)
        do_f = (f % 2 == 0) & (f >= 0) & (f < 2 * num_mb)
        do_b = (b % 2 == 0) & (b >= 0) & (b < 2 * num_mb)
        m_f, m_b = jnp.clip(f // 2, 0, num_mb - 1), jnp.clip(b // 2, 0, num_mb - 1)
        x_in, y_out = jax.lax.cond(do_f, fwd, lambda p, x, m: (x, x), params, x_recv, m_f)
        # Stage s holds at most S - s microbatches between their forward and backward, so
        # microbatch m can take buffer slot m mod S.
        keep = jnp.where(do_f, x_in, saved_SxBxLxD[m_f % stages])
        saved_SxBxLxD = jax.lax.dynamic_update_index_in_dim(saved_SxBxLxD, keep, m_f % stages, 0)
        dparams, dx_out, loss = jax.lax.cond(
            do_b,
            bwd,
            lambda p, x, dy, m: (jax.tree.map(jnp.zeros_like, p), dy, zeros_loss),
            params,
            saved_SxBxLxD[m_b % stages],
            dy_recv,
            m_b,
        )
        grads = jax.tree.map(jnp.add, grads, dparams)
        total = jax.tree.map(jnp.add, total, loss)
        x_recv, dy_recv = _shift(y_out, stages, 1), _shift(dx_out, stages, -1)
        return (params, x_recv, dy_recv, saved_SxBxLxD, grads, total), None

    init = (params, x0_BxLxD, x0_BxLxD, saved_SxBxLxD, zeros_grads, zeros_loss)
    (_, _, _, _, grads, total), _ = jax.lax.scan(slot, init, jnp.arange(2 * (num_mb + stages - 1)))
    return jax.lax.psum(total, STAGE), grads


def _split_stats(out: tuple[jax.Array, tuple[jax.Array, Stats]]) -> tuple[tuple, Stats]:
    """(y, (loss, stats)) -> ((y, loss), stats): vjp differentiates y and the loss only."""
    y_BxLxD, (loss, stats) = out
    return (y_BxLxD, loss), stats


def _is_block_path(path: tuple) -> bool:
    return getattr(path[0], "key", None) == "blocks"


def loss_and_grads(
    stage_graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_MxB: Batch,
    key: jax.Array | None,
    cfg: Any,
    loss_fn: LossFn,
) -> tuple[tuple[jax.Array, Stats], nnx.State]:
    """((summed loss, summed statistics), gradients of the summed loss) over microbatches
    ``batch_MxB`` ([M, B/M, ...]), pipelined over the active mesh's ``stage`` axis with
    ``cfg.train.pipeline_schedule``: the same values as the unpipelined model's.

    ``stage_graphdef`` is that of the model (a :class:`StageModel`) built with one stage's
    num_layers / stages layers: each stage merges its slice of the stacked layers into it."""
    active = _ACTIVE.get()
    if active is None:
        raise ValueError("pipeline parallelism needs an active mesh (parallel.activate)")
    mesh, rules = active
    stages = mesh.shape[STAGE]
    stage = _Stage(stage_graphdef, loss_fn, key, stages)
    rows, length = batch_MxB["inputs"].shape[1:3]
    dtype = jnp.dtype(cfg.model.dtype)
    specs = jax.tree_util.tree_map_with_path(
        lambda p, _: PartitionSpec(STAGE) if _is_block_path(p) else PartitionSpec(), params
    )

    def body(params: nnx.State, mbs: Batch) -> Any:
        # Layout constraints inside name the mesh as the shard_map sees it (stage manual).
        with activate(jax.sharding.get_abstract_mesh(), rules):
            return stage_body(params, mbs)

    def stage_body(params: nnx.State, mbs: Batch) -> Any:
        x0_BxLxD = _varying(jnp.zeros((rows, length, cfg.model.d_model), dtype))
        mbs = _varying(mbs)
        params = _varying(params)  # its transpose sums the replicated parameters' gradients
        if cfg.train.pipeline_schedule == "gpipe":
            return _gpipe(stage, params, mbs, x0_BxLxD)
        (loss, stats), grads = _one_f_one_b(stage, params, mbs, x0_BxLxD)
        # Block gradients stay on their stage; the embedding's and the head's, computed on
        # the first and last stage, are summed over the stages.
        grads = jax.tree_util.tree_map_with_path(
            lambda p, g: g if _is_block_path(p) else jax.lax.psum(g, STAGE), grads
        )
        return (loss, stats), grads

    def run(out_specs: Any) -> Callable:
        return jax.shard_map(
            body, mesh=mesh, in_specs=(specs, PartitionSpec()), out_specs=out_specs,
            axis_names={STAGE},
        )  # fmt: skip

    if cfg.train.pipeline_schedule == "gpipe":
        return jax.value_and_grad(run(PartitionSpec()), has_aux=True)(params, batch_MxB)
    return run(((PartitionSpec(), PartitionSpec()), specs))(params, batch_MxB)


def validate(cfg: ml_collections.ConfigDict, mesh: dict[str, int], *, pipelines: bool) -> None:
    """Pipeline parallelism (mesh.stage > 1) splits a decoder's scanned layers into equal
    stages and runs train.microbatches through them; ``pipelines`` says whether the
    config's family can be split (its task's ``pipelines``)."""
    m, t, stages = cfg.model, cfg.train, mesh["stage"]
    if stages == 1:
        return
    where = f"with mesh.stage x mesh.dcn_stage = {stages} pipeline stages"
    if not pipelines or not m.scan_layers or m.moe_experts:
        raise ConfigError(
            f"config keys 'model.family' ({m.family!r}), 'model.scan_layers' "
            f"({m.scan_layers}) and 'model.moe_experts' ({m.moe_experts}) {where}: "
            "pipelining needs a dense decoder with scanned layers (family='decoder', "
            "scan_layers=True, moe_experts=0); use mesh.stage=1 for the others"
        )
    if m.num_layers % stages:
        raise ConfigError(
            f"config key 'model.num_layers' ({m.num_layers}) must divide by the {stages} "
            "pipeline stages (mesh.stage x mesh.dcn_stage)"
        )
    if mesh.get("sequence", 1) > 1:
        raise ConfigError(
            f"config key 'mesh.sequence' ({mesh['sequence']}) must be 1 {where}: ring "
            "attention is not combined with pipelining yet"
        )
    if t.pipeline_schedule == "1f1b" and t.microbatches < stages:
        raise ConfigError(
            f"config key 'train.microbatches' ({t.microbatches}) must be at least the "
            f"{stages} pipeline stages for train.pipeline_schedule='1f1b'"
        )
