"""Shared test setup: 8 simulated CPU devices, and small config and batch factories."""

import os

# Must run before anything imports jax: the device count is fixed when the backend starts.
_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
# CPU unless asked: the mesh tests need the simulated devices. On a GPU machine
# `JAXFORMER_TEST_PLATFORMS=cuda pytest -n 0 tests/test_attention.py -k "cudnn or
# dots_attention"` runs the GPU-only tests (docs/performance.md).
os.environ["JAX_PLATFORMS"] = os.environ.get("JAXFORMER_TEST_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# A model small enough to compile in a second or two on a CPU.
TINY_OVERRIDES: dict[str, Any] = {
    "model.vocab_size": 128,
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.d_ff": 64,
    "model.max_len": 32,
    "data.seq_len": 16,
    "train.global_batch": 4,
    "train.steps": 20,
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "mesh.data": 1,
}

# The same tiny decoder as command-line overrides of configs/default.py (for tests that go
# through load_config or the CLI); test files add their run-specific flags.
TINY_CLI: list[str] = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.d_ff=64",
    "--config.model.max_len=32",
    "--config.data.seq_len=32",
    "--config.train.global_batch=8",
]


def _tiny_config(overrides: dict[str, Any] | None = None, *, base: bool = True) -> Any:
    """A checked, locked config: the schema, TINY_OVERRIDES (if ``base``), then ``overrides``.

    Keys are dotted (``"model.d_model"``); values are Python values, not strings.
    """
    from jaxformer.config import base_config, check_schema

    cfg = base_config()
    for key, value in {**(TINY_OVERRIDES if base else {}), **(overrides or {})}.items():
        section, _, leaf = key.rpartition(".")
        cfg[section][leaf] = value
    return check_schema(cfg)


# The data section of jaxformer.config's schema with test-friendly values (no grain
# workers, 64-token rows), for the data modules, which take the section alone.
DATA_FIELDS: dict[str, Any] = {
    "name": "stdlib",
    "paths": "",
    "tfds_name": "",
    "text_key": "text",
    "train_split": "train",
    "eval_split": "eval",
    "eval_fraction": 0.02,
    "data_dir": "",
    "tokenizer": "byte",
    "spm_model": "",
    "shuffle_seed": 0,
    "worker_count": 0,
    "seq_len": 64,
    "source_seq_len": 0,
    "source_key": "",
    "target_key": "",
}


def _data_config(**overrides: Any) -> Any:
    """A data-section ConfigDict: DATA_FIELDS, then ``overrides``."""
    from ml_collections import ConfigDict

    return ConfigDict({**DATA_FIELDS, **overrides})


def _assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Two lists of batches hold the same keys and the same arrays."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _random_batch(
    batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A train batch of random tokens (ids from 1), one document per row, all weighted."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
        "weights": np.ones((batch_size, seq_len), np.float32),
    }


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def make_config():
    """Factory: ``make_config({"model.d_model": 64})`` -> a small checked config."""
    return _tiny_config


@pytest.fixture(scope="session")
def make_batch():
    """Factory: ``make_batch(batch_size, seq_len, vocab_size, seed=0)`` -> numpy batch dict."""
    return _random_batch


@pytest.fixture(scope="session")
def make_data_config():
    """Factory: ``make_data_config(name="text_files", paths=...)`` -> a data-section
    ConfigDict (what ``jaxformer.data`` functions take) with test-friendly values."""
    return _data_config


@pytest.fixture(scope="session")
def assert_same_batches():
    """``assert_same_batches(a, b)``: two lists of numpy batch dicts are equal."""
    return _assert_same_batches
