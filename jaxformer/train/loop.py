"""The training loop: set up from a config, restore if the run exists, step, log, save."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import jaxformer
from jaxformer import data as jdata
from jaxformer import hardware, parallel
from jaxformer.errors import BadSteps, ConfigError, Preempted
from jaxformer.parallel import distributed
from jaxformer.tasks import task_for
from jaxformer.train.checkpoint import Checkpointer, abstract_like, check_resume, run_meta
from jaxformer.train.goodput import BUCKETS, Goodput
from jaxformer.train.init_from import load_params
from jaxformer.train.logs import RunLogger
from jaxformer.train.preemption import PreemptionWatcher
from jaxformer.train.setup import build, make_run_mesh, restore_params
from jaxformer.train.step import TrainState, head_metrics, jit_eval, jit_steps

log = logging.getLogger("jaxformer")


@dataclass
class Run:
    """Everything set up for a config: mesh, state, compiled steps, data, checkpoints."""

    cfg: ml_collections.ConfigDict
    mesh: Mesh
    graphdef: Any
    state: TrainState
    shardings: Any
    train_step: Any
    eval_step: Any
    tokenizer: Any
    checkpointer: Checkpointer
    run_dir: Path
    restored_step: int | None
    data_state: dict | None
    restored_meta: dict  # the checkpoint's meta item: config, versions, goodput
    train_data: Any  # grain IterDataset of this process's rows


def _dataset(cfg: ml_collections.ConfigDict, split: str, repeat: bool) -> Any:
    """This process's batches of ``split``, as the config's family builds them."""
    return task_for(cfg).dataset(cfg, split, repeat)


def describe(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> str:
    """The batch arithmetic printed at start and stored with the run."""
    t = cfg.train
    batch_shards = parallel.batch_shards(mesh_shape)
    per_shard = t.global_batch // batch_shards
    tokens = t.global_batch * cfg.data.seq_len
    return (
        f"mesh {mesh_shape} over {jax.device_count()} {jax.devices()[0].platform} devices "
        f"in {jax.process_count()} process(es)\n"
        f"global batch {t.global_batch} sequences x {cfg.data.seq_len} tokens = {tokens:,} "
        f"tokens/step; {batch_shards} batch shards ({' x '.join(parallel.batch_axes())}) "
        f"of {per_shard} sequences, "
        f"{t.microbatches} microbatch(es) of {per_shard // t.microbatches} per shard; "
        f"{t.global_batch // jax.process_count()} sequences loaded per process"
    )


def setup(cfg: ml_collections.ConfigDict, rules: parallel.sharding.Rules | None = None) -> Run:
    """Validates the config, builds the mesh and the state, and restores the latest checkpoint."""
    distributed.initialize(cfg)  # before any other JAX use: a no-op for one process
    run_mesh = make_run_mesh(cfg)  # validates: a bad config stops before the data opens
    task = task_for(cfg)
    tokenizer = jdata.build_tokenizer(cfg.data)
    # BERT's [MASK] and T5's 100 sentinels take the ids after the tokenizer's vocabulary.
    if tokenizer.vocab_size + task.reserved_ids > cfg.model.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}{task.reserved_what})"
        )
    # Open the data before compiling anything, so a missing dataset fails fast.
    train_data = _dataset(cfg, cfg.data.train_split, repeat=True)
    _dataset(cfg, cfg.data.eval_split, repeat=False)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_directory(run_dir)

    built = build(cfg, rules=rules, run_mesh=run_mesh)
    mesh, mesh_shape, dcn_shape = built.mesh, built.mesh_shape, built.dcn_shape
    graphdef, state, shardings = built.graphdef, built.state, built.shardings
    train_step, eval_step = jit_steps(cfg, graphdef, built.tx, mesh, built.rules, shardings)
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        keep=cfg.train.keep_checkpoints,
        every=cfg.train.checkpoint_every,
        use_async=cfg.train.async_checkpoints,
    )
    abstract = abstract_like(state, shardings)
    restored = checkpointer.restore_latest(
        abstract, check=functools.partial(check_resume, cfg, checkpointer, abstract)
    )
    if restored is not None:
        state = restored.state
    elif cfg.train.init_from:  # a fresh run starting from another run's weights
        state = load_params(cfg.train.init_from, state, shardings)
    # Written once the config is known to fit the run's checkpoints: a refused resume
    # leaves the run directory as it was.
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(cfg.to_json(indent=2, sort_keys=True) + "\n")
        info = {
            "jaxformer": jaxformer.__version__,
            "jax": jax.__version__,
            "mesh": mesh_shape,
            "mesh_dcn": dcn_shape,
            "batch": describe(cfg, mesh_shape),
        }
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return Run(
        cfg,
        mesh,
        graphdef,
        state,
        shardings,
        train_step,
        eval_step,
        tokenizer,
        checkpointer,
        run_dir,
        None if restored is None else restored.step,
        None if restored is None else restored.data,
        {} if restored is None else restored.meta,
        train_data,
    )


def _global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(run: Run, state: TrainState | None = None, max_batches: int | None = None) -> dict:
    """Held-out metrics of ``state`` (default: the run's): :func:`evaluate_params`."""
    state = run.state if state is None else state
    return evaluate_params(
        run.cfg, run.mesh, run.graphdef, run.eval_step, run.tokenizer, state.params,
        int(state.step), max_batches,
    )  # fmt: skip


def evaluate_params(
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    graphdef: nnx.GraphDef,
    eval_step: Any,
    tokenizer: Any,
    params: nnx.State,
    step: int,
    max_batches: int | None = None,
) -> dict:
    """Held-out loss, perplexity, accuracy, (byte tokenizer) bits per byte, and what the
    family adds (an encoder-decoder's BLEU after step 0), over ``train.eval_batches``
    batches (``max_batches`` 0: the whole split). ``eval_step`` is ``jit_eval``'s."""
    max_batches = cfg.train.eval_batches if max_batches is None else max_batches
    dataset = _dataset(cfg, cfg.data.eval_split, repeat=False)
    totals = {"weight": 0.0, "nll": 0.0, "correct": 0.0}
    target_bytes = 0
    for i, local in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        stats = eval_step(params, _global_batch(local, mesh))
        target_bytes += jdata.count_target_bytes(local, tokenizer)
        for k, v in jax.device_get(stats).items():
            totals[k] = totals.get(k, 0.0) + float(v)  # also sentence-level heads (NSP)
    weight = max(totals["weight"], 1.0)
    loss = totals["nll"] / weight
    out = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": totals["correct"] / weight,
        "tokens": totals["weight"],
    }
    out |= {k: float(v) for k, v in head_metrics(totals).items()}
    with parallel.activate(mesh):
        model = nnx.merge(graphdef, params)
        out |= task_for(cfg).extra_metrics(cfg, model, tokenizer, step)
    if jax.process_count() > 1:
        # Bytes are counted on each process's rows; the loss is over all rows.
        from jax.experimental import multihost_utils

        target_bytes = int(np.sum(multihost_utils.process_allgather(np.int64(target_bytes))))
    if target_bytes:
        out["bits_per_byte"] = totals["nll"] / math.log(2) / target_bytes
    return out


def train(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains ``cfg`` to ``train.steps``, resuming from ``train.run_dir`` if it has checkpoints.

    Returns the last train and eval metrics. Raises ``Preempted`` after saving a checkpoint
    when the run is asked to stop (SIGTERM), and ``BadSteps`` when ``train.max_bad_steps``
    steps in a row were skipped.
    """
    goodput = Goodput(Path(cfg.train.run_dir))
    run = setup(cfg)
    t = cfg.train
    start = run.restored_step or 0
    goodput.enabled = jax.process_index() == 0
    logger = RunLogger(
        run.run_dir,
        total_steps=t.steps,
        start_step=start,
        tensorboard=t.tensorboard,
        enabled=jax.process_index() == 0,
    )
    logger.info(f"jaxformer {jaxformer.__version__}: config\n{cfg}")
    logger.info(describe(cfg, dict(run.mesh.shape)))
    count = task_for(cfg).count_flops(cfg.model, cfg.data.seq_len)
    peak, peak_source = hardware.peak_flops(cfg.model.dtype)
    logger.info(
        f"{count.params:,} parameters ({count.non_embedding_params:,} non-embedding); "
        f"{count.train_flops_per_token:,} train FLOPs/token; MFU against {peak / 1e12:.3g} "
        f"TFLOP/s per device ({peak_source})"
    )
    if run.restored_step is not None:
        redone = goodput.resume(run.restored_meta.get("goodput"), start)
        lost = f"; {redone} step(s) run after it are redone" if redone else ""
        logger.info(f"resumed from checkpoint at step {start}{lost}")

    batches = iter(run.train_data)
    if run.data_state:  # empty in a checkpoint no batch was drawn for (tools/hf_convert.py)
        batches.set_state(run.data_state)
    mesh_shape = dict(run.mesh.shape)

    def save(step: int, state: TrainState) -> None:
        meta = run_meta(cfg, mesh_shape, goodput=goodput.state())
        run.checkpointer.save(step, state, batches.get_state(), meta)

    last: dict[str, Any] = {}
    if start == 0 and t.eval_every > 0:
        last["eval"] = evaluate(run)
        logger.write(0, "eval", last["eval"])
    goodput.charge("startup")

    watcher = PreemptionWatcher()
    state = run.state
    mark_step = reached = start
    try:
        for step in range(start + 1, t.steps + 1):
            batch = _global_batch(next(batches), run.mesh)
            goodput.charge("data")
            # jit compiles synchronously on the first call, then dispatches asynchronously.
            state, metrics = run.train_step(state, batch)
            reached = step
            if step == start + 1:
                goodput.charge("compile")
                logger.info(f"compiled the train step in {goodput.seconds['compile']:.1f}s")
                mark_time = time.perf_counter()
            logger.advance(step)
            if step % t.log_every == 0 or step == t.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                step_time = (now - mark_time) / (step - mark_step)
                tokens_per_sec = t.global_batch * cfg.data.seq_len / step_time
                model_flops = tokens_per_sec * count.train_flops_per_token
                values |= {
                    "step_time": step_time,
                    "tokens_per_sec": tokens_per_sec,
                    "tflops_per_device": model_flops / jax.device_count() / 1e12,
                    "mfu": model_flops / (peak * jax.device_count()),
                }
                logger.write(step, "train", values)
                logger.write(step, "goodput", goodput.metrics())
                goodput.write_ledger(step)
                last["train"] = values
                mark_time, mark_step = time.perf_counter(), step
                _check_bad_steps(values, step, t.max_bad_steps, run.checkpointer)
            goodput.charge("step")
            evaluating = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
            stopping, saving = watcher.should_stop(step), run.checkpointer.due(step)
            if evaluating or stopping or saving or step == t.steps:
                jax.block_until_ready(metrics)  # the steps in flight are productive time
                goodput.charge("step")
            if evaluating:
                eval_start = time.perf_counter()
                last["eval"] = evaluate(run, state)
                logger.write(step, "eval", last["eval"])
                mark_time += time.perf_counter() - eval_start  # step time excludes evaluation
                goodput.charge("eval")
            if stopping:
                save(step, state)
                run.checkpointer.wait()
                goodput.charge("checkpoint")
                goodput.write_ledger(step)
                raise Preempted(step, str(run.checkpointer.directory))
            if saving or step == t.steps:
                # Never save past a stopping streak: the last checkpoint stays the good one.
                _check_bad_steps(metrics, step, t.max_bad_steps, run.checkpointer)
                save(step, state)
                goodput.charge("checkpoint")
    finally:
        watcher.close()
        run.checkpointer.close()  # lets a save in flight finish, even after an error
        goodput.charge("checkpoint")
        goodput.write_ledger(reached)
        summary = goodput.metrics()
        logger.info(
            "goodput {:.1%} of {:.0f}s: ".format(summary["goodput"], summary["total_s"])
            + ", ".join(f"{k} {goodput.seconds[k]:.1f}s" for k in BUCKETS)
        )
        logger.close()
    run.state = state
    return last


def evaluate_checkpoint(
    cfg: ml_collections.ConfigDict, max_batches: int | None = None
) -> tuple[int, dict]:
    """``jaxformer eval``: the latest checkpoint's step and held-out metrics, restoring
    its parameters only (no optimizer state) and writing nothing into the run."""
    model, step, mesh = restore_params(cfg)
    graphdef, params = nnx.split(model)
    eval_step = jit_eval(cfg, graphdef, mesh, parallel.DEFAULT_RULES)
    tokenizer = jdata.build_tokenizer(cfg.data)
    return step, evaluate_params(
        cfg, mesh, graphdef, eval_step, tokenizer, params, step, max_batches
    )


def _check_bad_steps(metrics: dict, step: int, limit: int, checkpointer: Checkpointer) -> None:
    """Stops the run once ``limit`` steps in a row were skipped (read from the guard's
    counters in ``metrics``: no extra host round trip where metrics are fetched anyway)."""
    longest = int(jax.device_get(metrics["longest_in_a_row"]))
    if limit <= 0 or longest < limit:
        return
    steps = checkpointer.all_steps()
    kept = f"step {steps[-1]} in {checkpointer.directory}" if steps else "none yet"
    raise BadSteps(
        f"stopping at step {step}: {longest} steps in a row were skipped (non-finite loss "
        f"or gradients so far: {int(metrics['nonfinite_total'])}, loss spikes: "
        f"{int(metrics['spikes_total'])}; limit train.max_bad_steps={limit}). Parameters "
        f"were left as they were before the first of them; the last checkpoint is kept "
        f"({kept}). Look at the data and learning rate before this step, then resume."
    )
