"""Sequence-to-sequence data: (source, target) pairs -> jointly packed encoder/decoder rows.

Sources (``data.name``):

* ``'reverse_words'``: a built-in, offline translation task made from real text, so an
  encoder-decoder model can be trained and BLEU-scored on any machine without a
  download. Every line of the stdlib corpus (its train split for train, its eval split
  for eval) is whitespace-collapsed; lines of 3 to 12 words that are printable ASCII and
  fit the length limits are kept (deduplicated, in corpus order). The source is the
  line; the target is its words in reverse order with every ASCII letter ROT13-mapped
  (see :func:`reverse_words_target`), so the model must both translate characters and
  reorder words. The pair list is built once per (split, limit) and kept in memory.
* ``'tfds'``: a named, already prepared TFDS translation dataset (``data.tfds_name``,
  e.g. ``'wmt14_translate/de-en'``), read through the same path as the LM pipeline, with
  ``data.source_key`` / ``data.target_key`` naming the features (e.g. ``'de'`` / ``'en'``).

:func:`make_seq2seq_dataset` turns pairs into per-host batches with the same shuffling,
host slicing, checkpointing and prefetching as :func:`jaxformer.data.make_dataset`.
:func:`corpus_bleu` scores decoded outputs with sacrebleu.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict

from jaxformer.data.lm_dataset import (
    BATCH_KEYS,
    RecordSource,
    _local_data_dir,
    _seeds,
    _tfds_source,
    batch_and_prefetch,
    check_batching,
    load_documents,
    to_iter,
)
from jaxformer.data.objectives import span_corrupt
from jaxformer.data.tokenizers import Tokenizer, build_tokenizer
from jaxformer.errors import DataError, MissingDataError

logger = logging.getLogger(__name__)

ENCODER_KEYS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions")
SEQ2SEQ_BATCH_KEYS = ENCODER_KEYS + BATCH_KEYS
REVERSE_WORDS_MIN_WORDS = 3
REVERSE_WORDS_MAX_WORDS = 12
REVERSE_WORDS_MAX_PAIRS = {"train": 200_000}  # other splits: uncapped (eval is small)
_CAP_SEED = 20240601  # fixed: the capped subset must not depend on the run's seed

_ROT13 = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
)


# ---------------------------------------------------------------------------
# The built-in reverse_words task


def reverse_words_target(source: str) -> str:
    """The reverse_words rule: words reversed, ASCII letters ROT13-mapped.

    The rule is its own inverse on whitespace-collapsed text, which makes checks easy:
    ``reverse_words_target(reverse_words_target(s)) == s``.
    """
    return " ".join(reversed(source.split())).translate(_ROT13)


def _default_max_chars(data_cfg: Any) -> int | None:
    """Longest reverse_words line the config's sequence lengths hold (eos included)."""
    seq_len = int(data_cfg.get("seq_len", 0) or 0)
    if seq_len <= 0:
        return None
    source_len = int(data_cfg.get("source_seq_len", 0) or 0) or seq_len
    return min(source_len, seq_len) - 1


@functools.lru_cache(maxsize=8)
def _reverse_words_pairs(
    data_dir: str, eval_fraction: float, split: str, max_chars: int | None
) -> tuple[tuple[str, str], ...]:
    """Builds the (source, target) pairs of one split; cached per process."""
    start = time.perf_counter()
    stdlib_cfg = ConfigDict(
        {"name": "stdlib", "data_dir": data_dir, "eval_fraction": eval_fraction}
    )
    docs = load_documents(stdlib_cfg, split)
    lo, hi = REVERSE_WORDS_MIN_WORDS, REVERSE_WORDS_MAX_WORDS
    limit = max_chars if max_chars is not None else 1 << 30
    seen: set[str] = set()
    sources: list[str] = []
    lines = 0
    for i in range(len(docs)):  # random access: iter() would start grain's read threads
        for raw in docs[i].splitlines():
            lines += 1
            words = raw.split()
            if not lo <= len(words) <= hi:
                continue
            line = " ".join(words)
            if len(line) > limit or not (line.isascii() and line.isprintable()):
                continue
            if line not in seen:
                seen.add(line)
                sources.append(line)
    cap = REVERSE_WORDS_MAX_PAIRS.get(split.split("[", 1)[0])
    found = len(sources)
    if cap is not None and found > cap:
        keep = np.sort(np.random.default_rng(_CAP_SEED).choice(found, cap, replace=False))
        sources = [sources[i] for i in keep]
    logger.info(
        "reverse_words %s: %d pairs (%d distinct lines fit, from %d lines of %d documents) "
        "in %.2fs",
        split, len(sources), found, lines, len(docs), time.perf_counter() - start,
    )  # fmt: skip
    return tuple((s, reverse_words_target(s)) for s in sources)


def reverse_words_pairs(
    data_cfg: Any, split: str, *, max_chars: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The reverse_words pairs of ``split`` as a sequence of ``(source, target)``.

    ``max_chars`` (default: what ``data.source_seq_len``/``data.seq_len`` hold with
    eos) bounds the line length; lines are ASCII, so with the byte tokenizer it is the
    token count too.
    """
    if max_chars is None:
        max_chars = _default_max_chars(data_cfg)
    pairs = _reverse_words_pairs(
        _local_data_dir(data_cfg),
        float(data_cfg.get("eval_fraction", 0.02)),
        split,
        max_chars,
    )
    if not pairs:
        raise DataError(
            f"reverse_words split {split!r} has no pairs of at most {max_chars} characters; "
            "raise data.seq_len / data.source_seq_len."
        )
    return pairs


# ---------------------------------------------------------------------------
# Named TFDS translation datasets


class _ExtractPair(grain.transforms.Map):
    """Pulls the source/target text features out of a TFDS example as ``str``."""

    def __init__(self, source_key: str, target_key: str) -> None:
        self._keys = {"source": source_key, "target": target_key}

    def map(self, element: dict[str, Any]) -> dict[str, str]:
        out = {}
        for name, key in self._keys.items():
            text = element[key]
            if isinstance(text, np.ndarray):
                text = text.item()
            out[name] = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return out


def _tfds_pairs(data_cfg: Any, split: str) -> grain.MapDataset:
    source_key = data_cfg.get("source_key", "") or ""
    target_key = data_cfg.get("target_key", "") or ""
    # Legacy translation builders (wmt14_translate, ted_hrlr_translate, ...) register
    # only when their module is imported; it is cheap and does not import TensorFlow.
    import tensorflow_datasets.translate  # noqa: F401, PLC0415

    try:
        source = _tfds_source(data_cfg, split)
    except MissingDataError as e:
        raise MissingDataError(f"{e} (data.tfds_name={data_cfg.tfds_name!r})") from e
    features = source.dataset_info.features
    names = sorted(features.keys()) if hasattr(features, "keys") else []
    for config_key, key in (("data.source_key", source_key), ("data.target_key", target_key)):
        if not key or (names and key not in names):
            raise DataError(
                f"{config_key}={key!r} must name a text feature of TFDS dataset "
                f"{data_cfg.tfds_name!r} (data.tfds_name); it has {names}."
            )
    if len(source) == 0:
        raise DataError(f"Split {split!r} of data.tfds_name={data_cfg.tfds_name!r} is empty.")
    return grain.MapDataset.source(source).map(_ExtractPair(source_key, target_key))


def load_pairs(data_cfg: Any, split: str, *, max_chars: int | None = None) -> grain.MapDataset:
    """A random-access ``MapDataset`` of ``{"source": str, "target": str}`` for ``split``.

    Also the raw material for BLEU: decode ``source`` with the model and score against
    ``target``. ``max_chars`` only applies to reverse_words (see
    :func:`reverse_words_pairs`).
    """
    name = data_cfg.get("name", "")
    if name == "reverse_words":
        pairs = reverse_words_pairs(data_cfg, split, max_chars=max_chars)
        return grain.MapDataset.source(RecordSource(pairs, ("source", "target")))
    if name == "tfds":
        return _tfds_pairs(data_cfg, split)
    raise DataError(
        f"data.name={name!r} has no (source, target) pairs; sequence-to-sequence training "
        "needs data.name='reverse_words' or 'tfds' (with data.source_key/data.target_key)."
    )


# ---------------------------------------------------------------------------
# Transforms


class _TokenizePair(grain.transforms.Map):
    """Source -> ``source + eos``; target -> decoder ``bos + target`` and ``target + eos``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def map(self, pair: dict[str, str]) -> dict[str, np.ndarray]:
        tok = self._tokenizer
        source, target = tok.encode(pair["source"]), tok.encode(pair["target"])
        return {
            "encoder_inputs": np.concatenate([source, [tok.eos_id]], dtype=np.int32),
            "inputs": np.concatenate([[tok.bos_id], target], dtype=np.int32),
            "targets": np.concatenate([target, [tok.eos_id]], dtype=np.int32),
        }


class _FitsLimits(grain.transforms.Filter):
    """Drops pairs whose source or target (with eos) exceed the row lengths, counting them.

    Dropped rather than truncated: a truncated pair is no longer a translation of itself
    (and a truncated target never teaches the model to stop). Counts are per process
    (per grain worker) and logged at the first drop and every power of ten.
    """

    def __init__(self, source_len: int, target_len: int, split: str) -> None:
        self._source_len, self._target_len, self._split = source_len, target_len, split
        self.seen = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def filter(self, element: dict[str, np.ndarray]) -> bool:
        fits = (
            len(element["encoder_inputs"]) <= self._source_len
            and len(element["targets"]) <= self._target_len
        )
        with self._lock:
            self.seen += 1
            if fits:
                return True
            self.dropped += 1
            dropped, seen = self.dropped, self.seen
        if dropped == 10 ** (len(str(dropped)) - 1):  # 1, 10, 100, ...
            logger.warning(
                "seq2seq %s: dropped %d of %d pairs so far that exceed the row lengths "
                "(source %d = data.source_seq_len, target %d = data.seq_len, eos included).",
                self._split, dropped, seen, self._source_len, self._target_len,
            )  # fmt: skip
        return False

    def __getstate__(self) -> dict[str, Any]:  # locks don't pickle (grain workers)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames grain's packing outputs to the seq2seq batch keys, adds weights.

    grain numbers segments per row (one counter for all features), so pair k of a row
    is segment k on both the encoder and the decoder side.
    """
    segment_ids = packed["targets_segment_ids"].astype(np.int32)
    return {
        "encoder_inputs": packed["encoder_inputs"].astype(np.int32),
        "encoder_segment_ids": packed["encoder_inputs_segment_ids"].astype(np.int32),
        "encoder_positions": packed["encoder_inputs_positions"].astype(np.int32),
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": (segment_ids > 0).astype(np.float32),
    }


# ---------------------------------------------------------------------------
# The pipeline


def make_seq2seq_dataset(
    data_cfg: Any,
    *,
    split: str,
    source_len: int,
    target_len: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    seed: int,
    repeat: bool,
) -> grain.IterDataset:
    """The per-host seq2seq batch stream for ``split`` (iterate it with ``iter(ds)``).

    Each element is a dict of numpy arrays with ``B = global_batch // process_count``
    rows. Encoder side, ``[B, source_len]``: ``encoder_inputs`` (source tokens + eos),
    ``encoder_segment_ids``, ``encoder_positions``. Decoder side, ``[B, target_len]``:
    ``inputs`` (bos + target tokens), ``targets`` (target tokens + eos),
    ``segment_ids``, ``positions`` (int32) and ``weights`` (float32, 1.0 on real
    targets). Several pairs are packed per row; pair k of a row has segment id k on
    both sides (0 = padding), so decoder segment k cross-attends to encoder segment k
    only, and positions restart at 0 for every pair on both sides.

    Pairs whose source + eos exceed ``source_len`` or whose target + eos exceed
    ``target_len`` are dropped (counted and logged), never truncated; reverse_words
    builds only pairs that fit. Shuffling (new order per epoch with ``repeat``), host
    slicing, the padded final batch with ``repeat=False``, checkpointable state and
    prefetching behave exactly as in :func:`jaxformer.data.make_dataset`.
    """
    check_batching(global_batch, process_index, process_count, source_len, target_len)
    tokenizer = build_tokenizer(data_cfg)
    pair_seed, pack_seed = _seeds(seed, 2)

    pairs = load_pairs(data_cfg, split, max_chars=min(source_len, target_len) - 1)
    pairs = pairs.shuffle(seed=pair_seed)
    if repeat:
        pairs = pairs.repeat(None)  # grain reseeds the shuffle for every epoch
    pairs = pairs.map(_TokenizePair(tokenizer)).filter(_FitsLimits(source_len, target_len, split))
    ds = to_iter(pairs)
    return _pack_and_batch(
        ds, data_cfg, source_len, target_len, global_batch, process_index, process_count, pack_seed
    )


def _pack_and_batch(
    pairs: grain.IterDataset,
    data_cfg: Any,
    source_len: int,
    target_len: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    pack_seed: int,
) -> grain.IterDataset:
    """Tokenized pairs -> jointly packed seq2seq rows -> this host's batches."""
    ds = grain.experimental.FirstFitPackIterDataset(
        pairs,
        length_struct={"encoder_inputs": source_len, "inputs": target_len, "targets": target_len},
        num_packing_bins=min(max(16, global_batch), 128),
        seed=pack_seed,
        shuffle_bins=True,
    )
    ds = ds.map(_to_row)
    return batch_and_prefetch(ds, data_cfg, global_batch, process_index, process_count)


def span_corruption_lengths(
    source_len: int, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> tuple[int, int]:
    """The longest raw chunk whose corrupted input (with eos) fits ``source_len``, and the
    target length (sentinels, spans, eos) such a chunk needs (T5's random_spans_helper)."""

    def lengths(raw: int) -> tuple[int, int]:
        noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
        spans = max(int(round(noise / mean_span_length)), 1)
        return raw - noise + spans + 1, noise + spans + 1

    raw = 2
    while lengths(raw + 1)[0] <= source_len:
        raw += 1
    return raw, lengths(raw)[1]


class _ChunkTokens(grain.experimental.FlatMapTransform):
    """A document's tokens -> consecutive chunks of ``length`` (short tails dropped)."""

    def __init__(self, tokenizer: Tokenizer, length: int) -> None:
        self._tokenizer, self._length = tokenizer, length
        self.max_fan_out = 1 << 30

    def flat_map(self, text: str) -> list[np.ndarray]:
        tokens = self._tokenizer.encode(text)
        chunks = [tokens[i : i + self._length] for i in range(0, len(tokens), self._length)]
        return [c for c in chunks if len(c) >= 4]


class _SpanCorruptChunk(grain.transforms.RandomMap):
    """A chunk -> a T5 pair: corrupted input + eos; sentinel-and-span targets."""

    def __init__(self, tokenizer: Tokenizer, first_sentinel_id: int) -> None:
        self._eos, self._bos = tokenizer.eos_id, tokenizer.bos_id
        self._first_sentinel_id = first_sentinel_id

    def random_map(self, chunk: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        pair = span_corrupt(chunk, rng, first_sentinel_id=self._first_sentinel_id, eos_id=self._eos)
        targets = pair["targets"]
        return {
            "encoder_inputs": np.append(pair["inputs"], self._eos).astype(np.int32),
            "inputs": np.concatenate([[self._bos], targets[:-1]]).astype(np.int32),
            "targets": targets.astype(np.int32),
        }


def make_span_corruption_dataset(
    data_cfg: Any,
    *,
    split: str,
    source_len: int,
    target_len: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    seed: int,
    repeat: bool,
    first_sentinel_id: int,
) -> grain.IterDataset:
    """T5 pre-training batches from plain text (the LM sources), in the seq2seq format.

    Documents are cut into chunks sized so that their corrupted inputs fill
    ``source_len``; each chunk is span-corrupted (15% noise, mean span 3, sentinels
    counting down from ``first_sentinel_id``), redrawn every epoch, then packed like
    translation pairs. ``target_len`` must hold the targets
    (:func:`span_corruption_lengths`).
    """
    check_batching(global_batch, process_index, process_count, source_len, target_len)
    raw_len, needed = span_corruption_lengths(source_len)
    if needed > target_len:
        raise DataError(
            f"data.seq_len={target_len} cannot hold span-corruption targets of {needed} "
            f"tokens for data.source_seq_len={source_len}; raise data.seq_len to {needed}"
        )
    tokenizer = build_tokenizer(data_cfg)
    doc_seed, corrupt_seed, pack_seed = _seeds(seed, 3)
    docs = load_documents(data_cfg, split).shuffle(seed=doc_seed)
    if repeat:
        docs = docs.repeat(None)
    ds = to_iter(docs)
    ds = grain.experimental.FlatMapIterDataset(ds, _ChunkTokens(tokenizer, raw_len))
    ds = ds.random_map(_SpanCorruptChunk(tokenizer, first_sentinel_id), seed=corrupt_seed)
    return _pack_and_batch(
        ds, data_cfg, source_len, target_len, global_batch, process_index, process_count, pack_seed
    )


# ---------------------------------------------------------------------------
# Decoding and BLEU


def decode_until_eos(ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer) -> str:
    """Text of one generated sequence: everything before the first eos (bos/pad dropped)."""
    arr = np.asarray(ids).reshape(-1)
    stop = np.flatnonzero(arr == tokenizer.eos_id)
    return tokenizer.decode(arr[: stop[0]] if len(stop) else arr)


def decode_batch(ids: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """:func:`decode_until_eos` for every row of a ``[B, T]`` array of generated ids."""
    return [decode_until_eos(row, tokenizer) for row in np.asarray(ids).reshape(len(ids), -1)]


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenization, one reference).

    sacrebleu is the field's standard, comparable-across-papers implementation; it is
    imported here so training runs that never score BLEU don't load it.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    if not hypotheses:
        return 0.0
    import sacrebleu  # noqa: PLC0415

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
