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
from jaxformer import flops, hardware, parallel
from jaxformer.config import ConfigError, resolve_mesh, validate
from jaxformer.parallel import distributed
from jaxformer.train.checkpoint import Checkpointer, abstract_like, check_resume, run_meta
from jaxformer.train.errors import BadSteps, Preempted
from jaxformer.train.goodput import BUCKETS, Goodput
from jaxformer.train.init_from import load_params
from jaxformer.train.logs import RunLogger
from jaxformer.train.optim import make_optimizer
from jaxformer.train.preemption import PreemptionWatcher
from jaxformer.train.step import TrainState, head_metrics, init_state, jit_steps

log = logging.getLogger("jaxformer")

T5_SENTINELS = 100


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
    """This process's batches of ``split``: packed documents, or packed pairs for seq2seq."""
    hosts = dict(
        global_batch=cfg.train.global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=cfg.data.shuffle_seed,
        repeat=repeat,
    )
    if cfg.model.family == "t5":
        # Sentinels count down from the last id, as T5's <extra_id_0> = 32099 of 32128 does.
        return jdata.make_span_corruption_dataset(
            cfg.data, split=split, source_len=cfg.data.source_seq_len or cfg.data.seq_len,
            target_len=cfg.data.seq_len, first_sentinel_id=cfg.model.vocab_size - 1, **hosts,
        )  # fmt: skip
    if cfg.model.family == "encoder_decoder":
        return jdata.make_seq2seq_dataset(
            cfg.data, split=split, source_len=cfg.data.source_seq_len or cfg.data.seq_len,
            target_len=cfg.data.seq_len, **hosts,
        )  # fmt: skip
    if cfg.model.num_labels > 0:  # BERT fine-tuning: one labelled example per row
        return jdata.make_classification_dataset(
            cfg.data, split=split, seq_len=cfg.data.seq_len, num_labels=cfg.model.num_labels,
            **hosts,
        )  # fmt: skip
    # BERT's [MASK] is the first id after the tokenizer's vocabulary.
    mask_id = jdata.build_tokenizer(cfg.data).vocab_size if cfg.model.family == "bert" else None
    if cfg.data.nsp:  # BERT pre-training on sentence pairs: masked LM + next-sentence
        return jdata.make_nsp_dataset(
            cfg.data, split=split, seq_len=cfg.data.seq_len, mask_id=mask_id, **hosts
        )
    return jdata.make_dataset(
        cfg.data, split=split, seq_len=cfg.data.seq_len, mlm_mask_id=mask_id, **hosts
    )


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
    rules = parallel.DEFAULT_RULES if rules is None else rules
    distributed.initialize(cfg)  # before any other JAX use: a no-op for one process
    mesh_shape = validate(cfg, jax.device_count(), jax.process_count(), distributed.num_slices())
    _, dcn_shape = resolve_mesh(cfg.mesh, jax.device_count())
    tokenizer = jdata.build_tokenizer(cfg.data)
    # BERT's [MASK] and T5's 100 sentinels take the ids after the tokenizer's vocabulary.
    extra = {"bert": (1, " plus [MASK]"), "t5": (T5_SENTINELS, " plus 100 sentinels")}
    count, what = extra.get(cfg.model.family, (0, ""))
    if tokenizer.vocab_size + count > cfg.model.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}{what})"
        )
    # Open the data before compiling anything, so a missing dataset fails fast.
    train_data = _dataset(cfg, cfg.data.train_split, repeat=True)
    _dataset(cfg, cfg.data.eval_split, repeat=False)
    mesh = parallel.make_mesh(mesh_shape, dcn=dcn_shape)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_directory(run_dir)

    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, rules)
    train_step, eval_step = jit_steps(cfg, graphdef, tx, mesh, rules, shardings)
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
    """Held-out loss, perplexity, accuracy, (byte tokenizer) bits per byte and, for an
    encoder-decoder after step 0, BLEU (at step 0 every row would decode to the length cap
    for a BLEU of 0)."""
    cfg = run.cfg
    state = run.state if state is None else state
    max_batches = cfg.train.eval_batches if max_batches is None else max_batches
    dataset = _dataset(cfg, cfg.data.eval_split, repeat=False)
    totals = {"weight": 0.0, "nll": 0.0, "correct": 0.0}
    target_bytes = 0
    for i, local in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        stats = run.eval_step(state, _global_batch(local, run.mesh))
        target_bytes += jdata.count_target_bytes(local, run.tokenizer)
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
    if cfg.model.family == "encoder_decoder" and cfg.train.bleu_samples > 0 and int(state.step):
        out["bleu"] = bleu(run, state, cfg.train.bleu_samples)
    if jax.process_count() > 1:
        # Bytes are counted on each process's rows; the loss is over all rows.
        from jax.experimental import multihost_utils

        target_bytes = int(np.sum(multihost_utils.process_allgather(np.int64(target_bytes))))
    if target_bytes:
        out["bits_per_byte"] = totals["nll"] / math.log(2) / target_bytes
    return out


def bleu(run: Run, state: TrainState, samples: int) -> float:
    """Corpus BLEU of greedy translations (on the KV cache) of the first ``samples``
    held-out sources."""
    from jaxformer.decode import translate

    cfg, tokenizer = run.cfg, run.tokenizer
    source_len = cfg.data.source_seq_len or cfg.data.seq_len
    pairs = jdata.load_pairs(
        cfg.data, cfg.data.eval_split, max_chars=min(source_len, cfg.data.seq_len) - 1
    )
    pairs = [pairs[i] for i in range(min(samples, len(pairs)))]
    model = nnx.merge(run.graphdef, state.params)
    hypotheses = []
    rows = cfg.train.global_batch
    for start in range(0, len(pairs), rows):
        chunk = pairs[start : start + rows]
        ids = [np.append(tokenizer.encode(p["source"]), tokenizer.eos_id) for p in chunk]
        ids += [ids[-1]] * (rows - len(ids))  # fill the last batch; extra rows are ignored
        sources = np.zeros((rows, source_len), np.int32)
        for i, row in enumerate(ids):
            sources[i, : len(row)] = row
        # Generous cap: this task's targets are as long as their sources.
        steps = min(cfg.data.seq_len, max(len(r) for r in ids) + 8)
        with parallel.activate(run.mesh):
            out = translate(
                model, sources, sources > 0, max_new_tokens=steps,
                start_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
            )  # fmt: skip
        hypotheses += jdata.decode_batch(np.asarray(out), tokenizer)[: len(chunk)]
    return jdata.corpus_bleu(hypotheses, [p["target"] for p in pairs])


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
    count = flops.count(cfg.model, cfg.data.seq_len)
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
