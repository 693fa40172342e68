"""Tests for jaxformer.data: tokenizers, the text-files TFDS builder and the grain pipeline."""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from jaxformer.data import (
    BATCH_KEYS,
    ByteTokenizer,
    SentencePieceTokenizer,
    bits_per_byte,
    build_tokenizer,
    count_target_bytes,
    load_documents,
    make_dataset,
    text_files,
)

ROOT = Path(__file__).resolve().parents[1]
BYTE = ByteTokenizer()


DataConfigs = Callable[..., ConfigDict]  # data_config(**overrides) -> a data section


@pytest.fixture(scope="module")
def data_config(make_data_config: DataConfigs) -> DataConfigs:
    """Data configs over local text files unless told otherwise (conftest's factory)."""
    return functools.partial(make_data_config, name="text_files", eval_fraction=0.2)


def _write_docs(directory: Path, docs: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")


SHORT_DOCS = [f"short document number {i}: {'é' * (i % 3)}{'x' * (i % 17)}" for i in range(40)]
LONG_DOCS = [
    "".join(chr(ord("a") + (i * j) % 26) for j in range(n))
    for i, n in enumerate([5, 31, 32, 33, 64, 65, 200, 511, 1000])
] + ["line one\n    indented ünïcödé line\n"]


@pytest.fixture(scope="module")
def short_cfg(tmp_path_factory: pytest.TempPathFactory, data_config: DataConfigs) -> ConfigDict:
    """A corpus of documents that each fit in one 64-token row."""
    root = tmp_path_factory.mktemp("short")
    _write_docs(root / "corpus", SHORT_DOCS)
    return data_config(paths=str(root / "corpus" / "*.txt"), data_dir=str(root / "tfds"))


@pytest.fixture(scope="module")
def long_cfg(tmp_path_factory: pytest.TempPathFactory, data_config: DataConfigs) -> ConfigDict:
    """Documents around and far beyond seq_len=32, to exercise chunking."""
    root = tmp_path_factory.mktemp("long")
    _write_docs(root / "corpus", LONG_DOCS)
    return data_config(
        paths=str(root / "corpus" / "*.txt"), data_dir=str(root / "tfds"), eval_fraction=0.0
    )


def _all_batches(cfg: ConfigDict, **kwargs: object) -> list[dict[str, np.ndarray]]:
    args = {
        "split": "train",
        "seq_len": 64,
        "global_batch": 4,
        "process_index": 0,
        "process_count": 1,
        "seed": 0,
        "repeat": False,
    }
    args.update(kwargs)
    return list(make_dataset(cfg, **args))


def _take(it: object, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]  # type: ignore[call-overload]


def _segments(batch: dict[str, np.ndarray]) -> Iterator[tuple[np.ndarray, ...]]:
    """Yields (inputs, targets, positions) of every packed segment of every row."""
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            yield batch["inputs"][row][m], batch["targets"][row][m], batch["positions"][row][m]


def _expected_chunks(docs: list[str], seq_len: int) -> collections.Counter:
    counter: collections.Counter = collections.Counter()
    for doc in docs:
        toks = np.concatenate([[BYTE.bos_id], BYTE.encode(doc), [BYTE.eos_id]])
        inputs, targets = toks[:-1].tolist(), toks[1:].tolist()
        for s in range(0, len(inputs), seq_len):
            counter[(tuple(inputs[s : s + seq_len]), tuple(targets[s : s + seq_len]))] += 1
    return counter


def _check_row_layout(batch: dict[str, np.ndarray], seq_len: int, rows: int) -> None:
    assert set(batch) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert batch[k].shape == (rows, seq_len), k
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert batch[k].dtype == np.int32, k
    assert batch["weights"].dtype == np.float32
    seg = batch["segment_ids"]
    np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
    for k in ("inputs", "targets", "positions"):
        assert np.all(batch[k][seg == 0] == 0), f"{k} not zero on padding"
    for row in seg:
        real = row[row > 0]
        # Segments are 1, 2, 3, ... in order, contiguous, with padding only at the end.
        assert np.all(row[: len(real)] > 0)
        if len(real):
            assert real[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)


# ---------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    text = "def f(x):\n\treturn 'héllo, 世界' \r\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.min() >= 3 and ids.max() < 259
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xFF + 3]) == "\ufffd"  # invalid UTF-8 is replaced, not raised
    assert tok.encode("").shape == (0,)
    assert tok.token_bytes[:3].tolist() == [0, 0, 0] and tok.token_bytes[3:].sum() == 256


def test_missing_sentencepiece_model_error(tmp_path: Path, data_config: DataConfigs) -> None:
    missing = tmp_path / "nope.model"
    cfg = data_config(tokenizer="sentencepiece", spm_model=str(missing))
    with pytest.raises(FileNotFoundError, match="data.spm_model") as err:
        build_tokenizer(cfg)
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match="data.spm_model"):
        build_tokenizer(data_config(tokenizer="sentencepiece"))
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_tokenizer(data_config(tokenizer="wordpiece"))


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", ROOT / "tools/train_tokenizer.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sentencepiece_train_and_round_trip(tmp_path: Path, data_config: DataConfigs) -> None:
    docs = [
        "import os\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n",
        'class Foo:\n    """Docstring with ünïcödé and 漢字."""\n\n    x = 1  # comment\n',
        "while True:\n\tbreak\n" * 3,
    ] * 4
    _write_docs(tmp_path / "corpus", docs)
    prefix = tmp_path / "spm" / "tiny"
    rc = _load_tool().main(
        [
            "--paths", str(tmp_path / "corpus" / "*.txt"),
            "--data-dir", str(tmp_path / "tfds"),
            "--vocab-size", "400",
            "--eval-fraction", "0.2",
            "--output-prefix", str(prefix),
        ]
    )  # fmt: skip
    assert rc == 0
    assert prefix.with_suffix(".model").is_file() and prefix.with_suffix(".vocab").is_file()

    cfg = data_config(
        paths=str(tmp_path / "corpus" / "*.txt"),
        data_dir=str(tmp_path / "tfds"),
        tokenizer="sentencepiece",
        spm_model=str(prefix) + ".model",
    )
    tok = build_tokenizer(cfg)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 300 <= tok.vocab_size <= 400
    for text in [*docs, "unseen: ¿qué? ∑ 🙂\n  two  spaces"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.min() >= 3
        assert tok.decode(ids) == text  # byte exact, whitespace included
        assert tok.decode([1, *ids.tolist(), 2, 0]) == text
    assert len(tok.encode(docs[0])) < len(docs[0].encode())  # it actually merges

    # Through the pipeline: target bytes count exactly the text bytes of the split.
    batches = _all_batches(cfg, split="eval", seq_len=16, global_batch=2)
    n_bytes = sum(count_target_bytes(b, tok) for b in batches)
    assert n_bytes == sum(len(d.encode()) for d in load_documents(cfg, "eval"))


# ---------------------------------------------------------------------------
# The text-files builder


def test_text_files_builder_splits_and_cache(tmp_path: Path, data_config: DataConfigs) -> None:
    corpus = tmp_path / "corpus"
    _write_docs(corpus, [f"document {i}\n" for i in range(30)])
    (corpus / "empty.txt").write_text("  \n")
    data_dir = str(tmp_path / "tfds")
    cfg = data_config(paths=str(corpus / "*.txt"), data_dir=data_dir, eval_fraction=0.3)
    train = set(load_documents(cfg, "train"))
    evals = set(load_documents(cfg, "eval"))
    assert train.isdisjoint(evals)
    assert train | evals == {f"document {i}\n" for i in range(30)}  # empty doc skipped
    assert 0 < len(evals) < 30

    # Cached: the next call reuses the prepared directory untouched.
    builder_dirs = list((tmp_path / "tfds" / text_files.TextFiles.name).glob("files_*"))
    assert len(builder_dirs) == 1
    stamp = os.stat(builder_dirs[0]).st_mtime_ns
    assert set(load_documents(cfg, "eval")) == evals
    assert os.stat(builder_dirs[0]).st_mtime_ns == stamp

    # A changed corpus gets a new config (rebuild), and existing docs keep their split.
    (corpus / "zzz_new.txt").write_text("a brand new document\n")
    assert set(load_documents(cfg, "eval")) - {"a brand new document\n"} == evals
    assert len(list((tmp_path / "tfds" / text_files.TextFiles.name).glob("files_*"))) == 2

    with pytest.raises(ValueError, match="Split 'validation'"):
        load_documents(cfg, "validation")
    with pytest.raises(FileNotFoundError, match="data.paths"):
        load_documents(data_config(paths=str(tmp_path / "none" / "*.txt")), "train")
    assert "tensorflow" not in sys.modules


def test_jsonl_one_document_per_line(tmp_path: Path, data_config: DataConfigs) -> None:
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"body": f"record {i}", "id": i}) + "\n")
    cfg = data_config(paths=str(path), data_dir=str(tmp_path / "tfds"), text_key="body")
    docs = list(load_documents(cfg, "train")) + list(load_documents(cfg, "eval"))
    assert sorted(docs) == sorted(f"record {i}" for i in range(20))


def test_concurrent_prepare_builds_once(tmp_path: Path) -> None:
    _write_docs(tmp_path / "corpus", SHORT_DOCS)
    config = text_files.make_config(
        text_files.glob_files(str(tmp_path / "corpus" / "*.txt")), eval_fraction=0.1, label="files"
    )
    with ThreadPoolExecutor(4) as pool:
        builders = list(pool.map(lambda _: text_files.prepare(config, str(tmp_path)), range(4)))
    for b in builders:
        texts = [ex["text"].decode() for ex in b.as_data_source("train")]
        texts += [ex["text"].decode() for ex in b.as_data_source("eval")]
        assert sorted(texts) == sorted(SHORT_DOCS)
    leftovers = [
        p for p in (tmp_path / text_files.TextFiles.name).rglob("*") if "incomplete" in p.name
    ]
    assert not leftovers


def test_stdlib_corpus(tmp_path: Path, data_config: DataConfigs) -> None:
    files = text_files.stdlib_files()
    assert len(files) > 100
    assert not any("site-packages" in f.path or "__pycache__" in f.path for f in files)
    assert [f.key for f in files] == sorted(f.key for f in files)
    cfg = data_config(name="stdlib", data_dir=str(tmp_path), eval_fraction=0.02)
    eval_bytes = sum(len(d.encode()) for d in load_documents(cfg, "eval"))
    assert eval_bytes > 100_000
    assert len(load_documents(cfg, "train")) > 10 * len(load_documents(cfg, "eval"))
    batch = next(iter(make_dataset(
        cfg, split="train", seq_len=128, global_batch=8, process_index=0, process_count=1,
        seed=0, repeat=True,
    )))  # fmt: skip
    _check_row_layout(batch, 128, 8)
    assert "tensorflow" not in sys.modules


def test_missing_tfds_dataset_error(tmp_path: Path, data_config: DataConfigs) -> None:
    cfg = data_config(name="tfds", tfds_name="lm1b", data_dir=str(tmp_path), eval_split="test")
    with pytest.raises(FileNotFoundError) as err:
        make_dataset(
            cfg, split="train", seq_len=16, global_batch=2, process_index=0, process_count=1,
            seed=0, repeat=True,
        )  # fmt: skip
    msg = str(err.value)
    assert "'lm1b'" in msg and str(tmp_path) in msg and "tfds build lm1b" in msg
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset_xyz'"):
        load_documents(data_config(name="tfds", tfds_name="no_such_dataset_xyz"), "train")
    assert "tensorflow" not in sys.modules


class TinyNamedCorpus(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS dataset prepared offline, standing in for lm1b and friends."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"sentence": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager: object) -> dict:
        return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

    def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        for i in range(start, stop):
            yield i, {"sentence": f"sentence number {i}: " + "ab" * (i % 7)}


def test_named_tfds_dataset_goes_through_the_pipeline(
    tmp_path: Path, data_config: DataConfigs
) -> None:
    builder = TinyNamedCorpus(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    cfg = data_config(
        name="tfds", tfds_name="tiny_named_corpus", text_key="sentence",
        data_dir=str(tmp_path), eval_split="test",
    )  # fmt: skip
    docs = load_documents(cfg, "test")
    assert sorted(docs[i] for i in range(len(docs)))[0].startswith("sentence number 40")
    batches = _all_batches(cfg, seq_len=32, global_batch=4, split="test")
    tokens = sum(int(b["weights"].sum()) for b in batches)
    assert tokens == sum(len(docs[i].encode()) + 1 for i in range(len(docs)))
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------
# Packing, shuffling, sharding, checkpointing


def test_packing_short_documents(short_cfg: ConfigDict) -> None:
    batches = _all_batches(short_cfg, seq_len=64, global_batch=4)
    train_docs = list(load_documents(short_cfg, "train"))
    seen = []
    for b in batches:
        _check_row_layout(b, 64, 4)
        for inputs, targets, positions in _segments(b):
            np.testing.assert_array_equal(positions, np.arange(len(inputs)))
            # Each segment is one whole document: bos ... -> ... eos, nothing crosses.
            assert inputs[0] == BYTE.bos_id and targets[-1] == BYTE.eos_id
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            assert not np.isin(targets[:-1], [0, 1, 2]).any()
            seen.append(BYTE.decode(targets))
    assert sorted(seen) == sorted(train_docs)  # every document exactly once per epoch
    assert sum(b["weights"].sum() for b in batches) == sum(len(d.encode()) + 1 for d in train_docs)


def test_chunking_long_documents(long_cfg: ConfigDict) -> None:
    seq_len = 32
    batches = _all_batches(long_cfg, seq_len=seq_len, global_batch=3)
    observed: collections.Counter = collections.Counter()
    for b in batches:
        _check_row_layout(b, seq_len, 3)
        for inputs, targets, positions in _segments(b):
            np.testing.assert_array_equal(positions, np.arange(len(inputs)))
            observed[(tuple(inputs.tolist()), tuple(targets.tolist()))] += 1
    # Exactly the consecutive seq_len chunks of every document, each once: no text is
    # lost, duplicated, or predicted across a document boundary.
    assert observed == _expected_chunks(LONG_DOCS, seq_len)
    assert sum(count_target_bytes(b, BYTE) for b in batches) == sum(
        len(d.encode()) for d in LONG_DOCS
    )


def test_final_partial_batch_is_padded(short_cfg: ConfigDict) -> None:
    batches = _all_batches(short_cfg, seq_len=64, global_batch=64)
    assert len(batches) == 1  # the whole split fits in one (padded) global batch
    assert batches[0]["inputs"].shape == (64, 64)
    assert batches[0]["weights"][-1].sum() == 0


def test_determinism_by_seed(
    short_cfg: ConfigDict, assert_same_batches: Callable[..., None]
) -> None:
    kw = {"seq_len": 32, "global_batch": 4, "repeat": True}
    a = _take(iter(make_dataset(short_cfg, **_args(seed=7, **kw))), 6)
    b = _take(iter(make_dataset(short_cfg, **_args(seed=7, **kw))), 6)
    c = _take(iter(make_dataset(short_cfg, **_args(seed=8, **kw))), 6)
    assert_same_batches(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


def _args(**kwargs: object) -> dict[str, object]:
    args = {"split": "train", "process_index": 0, "process_count": 1}
    args.update(kwargs)
    return args


def test_host_sharding_matches_global_batch(short_cfg: ConfigDict) -> None:
    kw = {"seq_len": 32, "seed": 3, "repeat": True}
    full = _take(iter(make_dataset(short_cfg, **_args(global_batch=6, **kw))), 5)
    hosts = [
        _take(
            iter(
                make_dataset(
                    short_cfg, **_args(global_batch=6, process_count=2, **kw, process_index=p)
                )
            ),
            5,
        )
        for p in range(2)
    ]
    for step, batch in enumerate(full):
        for k in BATCH_KEYS:
            assert hosts[0][step][k].shape == (3, 32)
            joined = np.concatenate([hosts[0][step][k], hosts[1][step][k]])
            np.testing.assert_array_equal(joined, batch[k])
    with pytest.raises(ValueError, match="train.global_batch"):
        make_dataset(short_cfg, **_args(global_batch=5, process_index=0, process_count=2, **kw))


def test_iterator_state_resume(
    short_cfg: ConfigDict, assert_same_batches: Callable[..., None]
) -> None:
    ds = make_dataset(short_cfg, **_args(seq_len=32, global_batch=4, seed=1, repeat=True))
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    json.dumps(state)  # grain stores it as JSON
    expected = _take(it, 12)  # crosses epoch boundaries (the split has ~32 docs)
    fresh = iter(ds)
    fresh.set_state(state)
    assert_same_batches(_take(fresh, 12), expected)


def test_orbax_checkpoint_manager_round_trip(
    short_cfg: ConfigDict, tmp_path: Path, assert_same_batches: Callable[..., None]
) -> None:
    ds = make_dataset(short_cfg, **_args(seq_len=32, global_batch=4, seed=2, repeat=True))
    it = iter(ds)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = _take(it, 4)

    restored = iter(ds)
    _take(restored, 1)  # a different position, to be overwritten by the restore
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.latest_step() == 3
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(_take(restored, 4), expected)


def test_bits_per_byte() -> None:
    # 8 bytes predicted at uniform-over-256 cost ln(256) nats each -> exactly 8 bits/byte.
    assert math.isclose(bits_per_byte(8 * math.log(256), 8), 8.0)


def test_masked_lm_rows(short_cfg: ConfigDict) -> None:
    """BERT rows: the same packed tokens, 15% of real ones chosen, only those corrupted."""
    mask_id = BYTE.vocab_size
    plain = _all_batches(short_cfg, seq_len=64, global_batch=4)
    masked = _all_batches(short_cfg, seq_len=64, global_batch=4, mlm_mask_id=mask_id)
    chosen = eligible = replaced = 0
    for lm, mlm in zip(plain, masked, strict=True):
        np.testing.assert_array_equal(mlm["targets"], lm["inputs"])
        np.testing.assert_array_equal(mlm["segment_ids"], lm["segment_ids"])
        picked = mlm["weights"] > 0
        np.testing.assert_array_equal(mlm["inputs"][~picked], lm["inputs"][~picked])
        real = (lm["inputs"] > 2) & (lm["segment_ids"] > 0)  # not pad, bos or eos
        assert not (picked & ~real).any()
        chosen += picked.sum()
        eligible += real.sum()
        replaced += (mlm["inputs"][picked] == mask_id).sum()
    assert abs(chosen / eligible - 0.15) < 0.03
    assert abs(replaced / chosen - 0.8) < 0.1
    again = _all_batches(short_cfg, seq_len=64, global_batch=4, mlm_mask_id=mask_id)
    np.testing.assert_array_equal(again[0]["inputs"], masked[0]["inputs"])
