"""Tests for jaxformer.data.seq2seq: reverse_words pairs, joint packing, TFDS pairs, BLEU."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from jaxformer.data import (
    SEQ2SEQ_BATCH_KEYS,
    ByteTokenizer,
    DataError,
    MissingDataError,
    corpus_bleu,
    decode_batch,
    decode_until_eos,
    load_documents,
    load_pairs,
    make_seq2seq_dataset,
    reverse_words_target,
    seq2seq,
)

BYTE = ByteTokenizer()


DataConfigs = Callable[..., ConfigDict]  # data_config(**overrides) -> a data section


@pytest.fixture(scope="module")
def data_config(make_data_config: DataConfigs) -> DataConfigs:
    """Data configs for the reverse_words task unless told otherwise (conftest's factory)."""
    return functools.partial(make_data_config, name="reverse_words")


@pytest.fixture(scope="module")
def rw_cfg(tmp_path_factory: pytest.TempPathFactory, data_config: DataConfigs) -> ConfigDict:
    """reverse_words over a stdlib corpus prepared once into a temporary data_dir."""
    return data_config(data_dir=str(tmp_path_factory.mktemp("stdlib")))


class TinyTranslation(tfds.core.GeneratorBasedBuilder):
    """A registered translation dataset prepared offline, standing in for wmt14_translate."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"de": tfds.features.Text(), "en": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager: object) -> dict:
        return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

    def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        for i in range(start, stop):
            de, en = _tiny_pair(i)
            yield i, {"de": de, "en": en}


def _tiny_pair(i: int) -> tuple[str, str]:
    long = "sehr " * 20 if i == 7 else ""  # pair 7 is too long for source_len=32
    return f"{long}Satz Nummer {i} " + "ü" * (i % 4), f"sentence {i}"


def tiny_pairs(start: int, stop: int) -> list[tuple[str, str]]:
    return sorted(_tiny_pair(i) for i in range(start, stop))


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory, data_config: DataConfigs) -> ConfigDict:
    data_dir = tmp_path_factory.mktemp("tiny_translation")
    TinyTranslation(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_config(
        name="tfds", tfds_name="tiny_translation", data_dir=str(data_dir),
        source_key="de", target_key="en", eval_split="test",
    )  # fmt: skip


def _args(**kwargs: object) -> dict[str, object]:
    args: dict[str, object] = {
        "split": "train", "source_len": 32, "target_len": 24, "global_batch": 4,
        "process_index": 0, "process_count": 1, "seed": 0, "repeat": True,
    }  # fmt: skip
    args.update(kwargs)
    return args


def _take(it: object, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]  # type: ignore[call-overload]


def _check_batch(batch: dict[str, np.ndarray], rows: int, source_len: int, target_len: int) -> None:
    """Layout: shapes, dtypes, weights, zero padding, segments 1..n in order on both sides."""
    assert set(batch) == set(SEQ2SEQ_BATCH_KEYS)
    for k in SEQ2SEQ_BATCH_KEYS:
        length = source_len if k.startswith("encoder_") else target_len
        assert batch[k].shape == (rows, length), k
        assert batch[k].dtype == (np.float32 if k == "weights" else np.int32), k
    np.testing.assert_array_equal(batch["weights"], (batch["segment_ids"] > 0).astype(np.float32))
    for prefix in ("encoder_", ""):
        seg = batch[f"{prefix}segment_ids"]
        for k in ("inputs", "positions") + (("targets",) if not prefix else ()):
            assert np.all(batch[f"{prefix}{k}"][seg == 0] == 0), f"{prefix}{k} not 0 on padding"
        for row in seg:
            real = row[row > 0]
            assert np.all(row[: len(real)] > 0)  # padding only at the end
            if len(real):
                assert real[0] == 1 and set(np.diff(real).tolist()) <= {0, 1}


def _pairs_of(batch: dict[str, np.ndarray]) -> Iterator[tuple[str, str]]:
    """Decodes every packed pair, checking the encoder/decoder segment alignment."""
    for r in range(batch["inputs"].shape[0]):
        enc_seg, dec_seg = batch["encoder_segment_ids"][r], batch["segment_ids"][r]
        segments = np.unique(dec_seg[dec_seg > 0])
        np.testing.assert_array_equal(np.unique(enc_seg[enc_seg > 0]), segments)
        for s in segments:
            em, dm = enc_seg == s, dec_seg == s
            enc = batch["encoder_inputs"][r][em]
            inputs, targets = batch["inputs"][r][dm], batch["targets"][r][dm]
            np.testing.assert_array_equal(batch["encoder_positions"][r][em], np.arange(len(enc)))
            np.testing.assert_array_equal(batch["positions"][r][dm], np.arange(len(inputs)))
            # Teacher forcing within the pair: inputs are bos + targets shifted right.
            assert inputs[0] == BYTE.bos_id and targets[-1] == BYTE.eos_id
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            assert enc[-1] == BYTE.eos_id and not np.isin(enc[:-1], [0, 1, 2]).any()
            assert not np.isin(targets[:-1], [0, 1, 2]).any()
            yield BYTE.decode(enc), BYTE.decode(targets)


# ---------------------------------------------------------------------------
# reverse_words


def test_reverse_words_rule() -> None:
    assert reverse_words_target("def f(x): return x") == "k erghea s(k): qrs"
    assert reverse_words_target("ABC xyz 123") == "123 klm NOP"
    for s in ["import os as _os", "a  b\tc", "x = [1, 2]  # Zz"]:
        assert reverse_words_target(reverse_words_target(s)) == " ".join(s.split())


def test_reverse_words_pairs(rw_cfg: ConfigDict, data_config: DataConfigs) -> None:
    load_documents(data_config(name="stdlib", data_dir=rw_cfg.data_dir), "train")  # prepare
    build = seq2seq._reverse_words_pairs.__wrapped__  # uncached: time and determinism
    start = time.perf_counter()
    train = build(rw_cfg.data_dir, 0.02, "train", 63)
    seconds = time.perf_counter() - start
    evals = build(rw_cfg.data_dir, 0.02, "eval", 63)
    print(
        f"reverse_words pairs: train={len(train)} eval={len(evals)}, train built in {seconds:.2f}s"
    )
    assert seconds < 20  # ~1-2 s on a laptop; generous for loaded CI machines
    assert 20_000 <= len(train) <= seq2seq.REVERSE_WORDS_MAX_PAIRS["train"]
    assert 500 <= len(evals) < len(train) // 10
    assert build(rw_cfg.data_dir, 0.02, "eval", 63) == evals  # deterministic

    # load_pairs (what the pipeline and BLEU evaluation read) gives the same pairs.
    ds = load_pairs(rw_cfg, "eval")  # seq_len=64 -> lines of at most 63 characters
    assert [(ds[i]["source"], ds[i]["target"]) for i in range(len(ds))] == list(evals)

    rng = np.random.default_rng(0)
    for pairs in (train, evals):
        assert len({s for s, _ in pairs}) == len(pairs)  # deduplicated
        for i in rng.choice(len(pairs), 500, replace=False):
            source, target = pairs[i]
            assert 3 <= len(source.split()) <= 12 and len(source) <= 63
            assert source.isascii() and source.isprintable() and source == " ".join(source.split())
            # Un-ROT13 and re-reverse the target: the source again.
            assert " ".join(reversed(target.split())).translate(seq2seq._ROT13) == source

    # Eval pairs come from eval documents only.
    eval_lines = {
        " ".join(line.split())
        for doc in load_documents(data_config(name="stdlib", data_dir=rw_cfg.data_dir), "eval")
        for line in doc.splitlines()
    }
    assert {s for s, _ in evals} <= eval_lines
    with pytest.raises(DataError, match="data.seq_len"):
        load_pairs(rw_cfg, "eval", max_chars=3)


def test_packing_reverse_words_one_epoch(rw_cfg: ConfigDict) -> None:
    source_len, target_len = 48, 40
    batches = list(
        make_seq2seq_dataset(
            rw_cfg, **_args(split="eval", source_len=source_len, target_len=target_len,
                            global_batch=8, repeat=False)
        )
    )  # fmt: skip
    seen = []
    for batch in batches:
        _check_batch(batch, 8, source_len, target_len)
        seen.extend(_pairs_of(batch))
    for source, target in seen:
        assert target == reverse_words_target(source)
    expected = load_pairs(rw_cfg, "eval", max_chars=min(source_len, target_len) - 1)
    assert sorted(seen) == sorted((p["source"], p["target"]) for p in expected)  # each once
    multi = sum(int(b["segment_ids"][r].max() > 1) for b in batches for r in range(8))
    assert multi > len(batches)  # rows really hold several pairs


# ---------------------------------------------------------------------------
# Named TFDS translation datasets


def test_named_tfds_translation_dataset(
    tiny_cfg: ConfigDict, caplog: pytest.LogCaptureFixture
) -> None:
    ds = load_pairs(tiny_cfg, "test")
    assert sorted((ds[i]["source"], ds[i]["target"]) for i in range(len(ds))) == tiny_pairs(40, 50)
    with caplog.at_level(logging.WARNING, logger=seq2seq.__name__):
        batches = list(make_seq2seq_dataset(tiny_cfg, **_args(repeat=False)))
    seen = []
    for batch in batches:
        _check_batch(batch, 4, 32, 24)
        seen.extend(_pairs_of(batch))
    # Pair 7's source (100+ bytes) does not fit source_len=32: dropped and counted.
    assert sorted(seen) == [p for p in tiny_pairs(0, 40) if p != _tiny_pair(7)]
    assert "dropped 1 of" in caplog.text and "data.source_seq_len" in caplog.text

    with pytest.raises(DataError, match="data.target_key='fr'.*'de', 'en'"):
        load_pairs(ConfigDict({**tiny_cfg.to_dict(), "target_key": "fr"}), "train")
    with pytest.raises(DataError, match="data.source_key"):
        load_pairs(ConfigDict({**tiny_cfg.to_dict(), "source_key": ""}), "train")
    assert "tensorflow" not in sys.modules


def test_missing_named_dataset(tmp_path: Path, data_config: DataConfigs) -> None:
    cfg = data_config(
        name="tfds", tfds_name="wmt14_translate/de-en", data_dir=str(tmp_path),
        source_key="de", target_key="en",
    )  # fmt: skip
    with pytest.raises(MissingDataError, match="data.tfds_name") as err:
        make_seq2seq_dataset(cfg, **_args())
    msg = str(err.value)
    assert "'wmt14_translate/de-en'" in msg and str(tmp_path) in msg
    assert "tfds build wmt14_translate/de-en" in msg
    with pytest.raises(DataError, match="data.name='stdlib'"):
        make_seq2seq_dataset(data_config(name="stdlib"), **_args())
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------
# Shuffling, sharding, checkpointing


def test_determinism_by_seed(
    tiny_cfg: ConfigDict, assert_same_batches: Callable[..., None]
) -> None:
    a = _take(iter(make_seq2seq_dataset(tiny_cfg, **_args(seed=7))), 8)
    b = _take(iter(make_seq2seq_dataset(tiny_cfg, **_args(seed=7))), 8)
    c = _take(iter(make_seq2seq_dataset(tiny_cfg, **_args(seed=8))), 8)
    assert_same_batches(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


def test_epochs_are_reshuffled(tiny_cfg: ConfigDict) -> None:
    """With repeat, every epoch holds every pair once, in a new order."""
    # target_len=21 holds one pair per row; 39 pairs (7 is dropped), 16 packing bins:
    # 16 epochs end exactly at a packing-group boundary.
    args = _args(global_batch=1, source_len=32, target_len=21)
    batches = _take(iter(make_seq2seq_dataset(tiny_cfg, **args)), 39 * 16)
    stream = [pair for batch in batches for pair in _pairs_of(batch)]
    assert len(stream) == 39 * 16
    expected = [p for p in tiny_pairs(0, 40) if p != _tiny_pair(7)]
    assert sorted(set(stream)) == expected
    assert all(stream.count(p) == 16 for p in expected)
    assert stream[:39] != stream[39:78]


def test_host_sharding_matches_global_batch(rw_cfg: ConfigDict) -> None:
    kw = {"split": "eval", "global_batch": 6, "seed": 3}
    full = _take(iter(make_seq2seq_dataset(rw_cfg, **_args(**kw))), 4)
    hosts = [
        _take(
            iter(make_seq2seq_dataset(rw_cfg, **_args(process_index=p, process_count=2, **kw))), 4
        )
        for p in range(2)
    ]
    for step, batch in enumerate(full):
        for k in SEQ2SEQ_BATCH_KEYS:
            assert hosts[0][step][k].shape[0] == 3
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][step][k], hosts[1][step][k]]), batch[k], err_msg=k
            )
    with pytest.raises(ValueError, match="train.global_batch"):
        make_seq2seq_dataset(rw_cfg, **_args(global_batch=5, process_count=2))


def test_iterator_state_resume(
    tiny_cfg: ConfigDict, assert_same_batches: Callable[..., None]
) -> None:
    ds = make_seq2seq_dataset(tiny_cfg, **_args(seed=1))
    it = iter(ds)
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)  # grain stores it as JSON
    expected = _take(it, 12)  # crosses epoch boundaries (39 pairs, several per row)
    fresh = iter(ds)
    _take(fresh, 1)
    fresh.set_state(state)
    assert_same_batches(_take(fresh, 12), expected)


# ---------------------------------------------------------------------------
# Decoding and BLEU


def test_decode_until_eos() -> None:
    ids = [BYTE.bos_id, *BYTE.encode("héllo").tolist(), BYTE.eos_id, *BYTE.encode("junk"), 0]
    assert decode_until_eos(ids, BYTE) == "héllo"
    assert decode_until_eos(BYTE.encode("no eos"), BYTE) == "no eos"
    batch = np.zeros((2, 12), np.int32)
    batch[0, :3] = [*BYTE.encode("ab"), BYTE.eos_id]
    batch[1, :5] = BYTE.encode("abcde")
    assert decode_batch(batch, BYTE) == ["ab", "abcde"]


def test_corpus_bleu() -> None:
    import sacrebleu

    refs = ["the cat sat on a mat", "a quick brown fox jumps over the lazy dog"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    # By hand: precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty -> (1/12) ** (1/4).
    got = corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got == pytest.approx(100 * (1 / 12) ** 0.25, rel=1e-9)
    hyps = ["the cat sat on the mat", "a fast brown fox jumped over the dog"]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < corpus_bleu(hyps, refs) < 100 and not math.isnan(corpus_bleu(hyps, refs))
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(hyps, refs[:1])


def test_no_tensorflow() -> None:
    assert "tensorflow" not in sys.modules


def test_span_corruption_batches_restore_the_text(tmp_path: Path) -> None:
    """T5 rows: each pair's sentinels and spans put back give a run of the original text."""
    from jaxformer.data import make_span_corruption_dataset
    from jaxformer.data.seq2seq import span_corruption_lengths

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = " ".join(f"word{i}" for i in range(400))
    (corpus / "a.txt").write_text(text)
    (corpus / "b.txt").write_text(text[::-1])
    cfg = ConfigDict(
        dict(name="text_files", paths=str(corpus / "*.txt"), tfds_name="", text_key="text",
             train_split="train", eval_split="eval", eval_fraction=0.0, data_dir=str(tmp_path),
             tokenizer="byte", spm_model="", shuffle_seed=0, worker_count=0)
    )  # fmt: skip
    assert span_corruption_lengths(512) == (568, 114)  # T5's own numbers
    ds = make_span_corruption_dataset(
        cfg, split="train", source_len=64, target_len=16, global_batch=4, process_index=0,
        process_count=1, seed=0, repeat=False, first_sentinel_id=383,
    )  # fmt: skip
    restored = 0
    for batch in ds:
        for row in range(4):
            for seg in set(batch["encoder_segment_ids"][row]) - {0}:
                src = batch["encoder_inputs"][row][batch["encoder_segment_ids"][row] == seg]
                tgt = batch["targets"][row][batch["segment_ids"][row] == seg]
                dec = batch["inputs"][row][batch["segment_ids"][row] == seg]
                assert src[-1] == 2 and tgt[-1] == 2 and dec[0] == 1
                np.testing.assert_array_equal(dec[1:], tgt[:-1])
                spans = np.split(tgt[:-1], np.flatnonzero(tgt[:-1] >= 300))[1:]
                out = []
                for token in src[:-1]:
                    out.extend(spans[383 - token][1:] if token >= 300 else [token])
                assert bytes((np.asarray(out) - 3).astype(np.uint8)).decode() in text + text[::-1]
                restored += 1
    assert restored > 10
