"""Levanter as a peer: its PyPI install, the shape as its ``TrainLmConfig`` YAML, synthetic
tokens injected as an in-memory dataset, and the step times its JSON tracker logs."""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

from peers.common import RunResult, Shape, child_env, run_logged, timed_result
from peers.venv import jax_pins

NAME = "levanter"
# Distributions whose versions are recorded.
VERSIONS = ("marin-levanter", "marin-haliax", "equinox", "jax", "jaxlib", "optax")
# How the step time is measured, for the BENCHMARKS.md section.
STEP_TIME = (
    "Levanter, the `throughput/duration` its tracker logs (the step to completion, "
    "without data loading)"
)
# Levanter's own entry point, with a local tokenizer and synthetic rows in place of data.
MAIN = textwrap.dedent(
    """
    import dataclasses, sys
    import jax.numpy as jnp
    import numpy as np
    import levanter.config
    from levanter.data.dataset import ListAsyncDataset
    from levanter.data.text.datasets import DirectDatasetComponent
    from levanter.data.text.examples import GrugLmExample
    from levanter.main import train_lm

    VOCAB, SEQ, ROWS = (int(x) for x in sys.argv[1:4])
    TOKENIZER_DIR = sys.argv[4]

    def write_tokenizer(path):
        # Levanter's LLaMA checkpoint converter loads a tokenizer when the run starts (from
        # the hub unless model.tokenizer names a directory): a word-level one of VOCAB ids.
        import json, os
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
        os.makedirs(path, exist_ok=True)
        vocab = {"<unk>": 0, **{str(i): i for i in range(1, VOCAB)}}
        tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = WhitespaceSplit()
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}, f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "vocab_size": VOCAB}, f)

    def main(config: train_lm.TrainLmConfig):
        write_tokenizer(TOKENIZER_DIR)
        # Synthetic tokens: a programmatic ("direct") dataset component in place of a cache.
        rng = np.random.default_rng(0)
        rows = [
            GrugLmExample.causal(jnp.asarray(rng.integers(0, VOCAB, SEQ, dtype=np.int32)))
            for _ in range(ROWS)
        ]
        train = DirectDatasetComponent(datasets={"train": ListAsyncDataset(rows)})
        data = dataclasses.replace(
            config.data, components={"synthetic": train}, train_weights=None
        )
        train_lm.main(dataclasses.replace(config, data=data))

    levanter.config.main(main, args=sys.argv[5:])()
    """
)
STEP_RECORD = re.compile(r'"step": (\d+), "metrics": \{[^\n]*?"throughput/duration": ([\d.e+-]+)')
LOSS_RECORD = re.compile(r'"step": (\d+), "metrics": \{[^\n]*?"train/loss": ([\d.e+-]+|NaN)')
PARAMS_RECORD = re.compile(r'"parameter_count": (\d+)')


def packages(version: str | None, jax_version: str | None) -> Callable[[Path], list[list[str]]]:
    """``pip install marin-levanter`` (its CPU jax comes with it, or ``jax_version``)."""
    spec = f"marin-levanter=={version}" if version else "marin-levanter"
    return lambda python: [[spec, *jax_pins(jax_version)]]


def config(shape: Shape, steps: int, out_dir: Path) -> str:
    """Levanter's YAML config (``TrainLmConfig``) for ``shape``; the data is injected."""
    compute = {"float32": "f32", "bfloat16": "bf16"}[shape.dtype]
    return textwrap.dedent(
        f"""
        data:
          tokenizer: passthrough  # integer ids as they are: no tokenizer files, no hub
          vocab_size: {shape.vocab}
          cache_dir: {out_dir / "cache"}
        train_seq_len: {shape.seq}
        model:
          type: llama
          max_seq_len: {shape.seq}
          hidden_dim: {shape.d_model}
          intermediate_dim: {shape.d_ff}
          num_layers: {shape.layers}
          num_heads: {shape.heads}
          num_kv_heads: {shape.heads}
          head_dim: {shape.head_dim}
          activation_function: silu
          tie_word_embeddings: false
          gradient_checkpointing: false
          scan_layers: true
          tokenizer: {out_dir / "tokenizer"}
          reference_checkpoint: {out_dir / "tokenizer"}
        optimizer:
          learning_rate: 3e-3
          weight_decay: 0.1
        trainer:
          require_accelerator: false
          mp: p=f32,c={compute}
          tracker:
            type: json_logger
          watch:
            interval: 0
          train_batch_size: {shape.batch}
          num_train_steps: {steps}
          steps_per_eval: 100000000
          log_dir: {out_dir / "logs"}
          checkpointer:
            base_path: {out_dir / "checkpoints"}
            save_interval: 100000000s
            keep: []
        """
    )


def run(
    python: Path, shape: Shape, steps: int, warmup: int, log: Path, timeout: float
) -> RunResult:
    """Train with ``levanter.main.train_lm`` on a synthetic in-memory dataset."""
    out_dir = log.parent / (log.stem + "-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.yaml"
    config_path.write_text(config(shape, warmup + steps, out_dir))
    rows = shape.batch * (warmup + steps)
    cmd = [
        str(python),
        "-c",
        MAIN,
        str(shape.vocab),
        str(shape.seq),
        str(rows),
        str(out_dir / "tokenizer"),
        "--config_path",
        str(config_path),
    ]
    try:
        text = run_logged(cmd, log, child_env(), timeout, out_dir)
    finally:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    times = {int(m[1]): float(m[2]) for m in STEP_RECORD.finditer(text)}
    losses = {int(m[1]): float(m[2]) for m in LOSS_RECORD.finditer(text)}
    return timed_result(
        NAME, times, min(times) if times else 0, warmup,
        PARAMS_RECORD.search(text), losses[max(losses)] if losses else None,
        f"no 'throughput/duration' records after {warmup} steps (log: {log})",
    )  # fmt: skip
