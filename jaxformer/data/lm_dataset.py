"""The grain input pipeline: documents -> tokens -> chunks -> packed rows -> host batches.

Stages (all grain, all checkpointable through ``it.get_state()``/``it.set_state()``):

1. ``MapDataset`` over an array_record data source (random access, so the global
   per-epoch shuffle and the iterator state are cheap: the state is an index).
2. Tokenize each document as ``[bos] + tokens + [eos]`` (a grain map, run by the
   read threads).
3. Cut each document into consecutive chunks of at most ``seq_len`` (input, target)
   pairs, so no text is lost, and shuffle chunks in a window so a batch mixes many
   documents rather than being made of consecutive pieces of one long file.
4. Pack chunks into ``seq_len`` rows with grain's first-fit packing (segment ids and
   positions come from grain), then batch ``global_batch`` rows.
5. Every host runs the same global pipeline and keeps only its own rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from jaxformer.data import text_files
from jaxformer.data.objectives import bert_mask
from jaxformer.data.tokenizers import Tokenizer, build_tokenizer
from jaxformer.errors import DataError, MissingDataError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
_MIN_SHUFFLE_WINDOW = 1024  # chunks


# ---------------------------------------------------------------------------
# Sources


def _local_data_dir(data_cfg: Any) -> str:
    return os.path.expanduser(data_cfg.get("data_dir", "") or text_files.default_data_dir())


def _tfds_source(data_cfg: Any, split: str) -> Any:
    """Opens a named, already prepared TFDS dataset without downloading anything."""
    name = data_cfg.tfds_name
    if not name:
        raise DataError("data.name='tfds' needs data.tfds_name (e.g. 'lm1b').")
    data_dir = os.path.expanduser(data_cfg.get("data_dir", "")) or None
    where = data_dir or f"the default TFDS data_dir ({tfds.core.constants.DATA_DIR})"
    how = (
        f"Prepare it once on a machine with network access, in array_record format, e.g. "
        f"`tfds build {name} --file_format=array_record"
        + (f" --data_dir={data_dir}`" if data_dir else "`")
        + " (some datasets need TensorFlow to prepare), or set data.data_dir to where it is."
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"Unknown TFDS dataset {name!r} (data.tfds_name).") from e
    if not builder.is_prepared():
        raise MissingDataError(
            f"TFDS dataset {name!r} is not prepared in {where} "
            f"(looked for {builder.data_dir}). {how}"
        )
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:  # prepared as tfrecord: no random access
        raise DataError(f"TFDS dataset {name!r} in {where} is not array_record. {how}") from e


def _text_files_source(data_cfg: Any, split: str, *, stdlib: bool) -> Any:
    """Builds (once, cached in data_dir) and opens the local-text-files dataset."""
    if stdlib:
        files, label = text_files.stdlib_files(), "stdlib"
    else:
        paths = data_cfg.get("paths", "")
        if not paths:
            raise DataError("data.name='text_files' needs data.paths (a glob, comma-separated).")
        files, label = text_files.glob_files(paths), "files"
    # text_key only matters for .jsonl; keep it out of the cache key otherwise.
    has_jsonl = any(f.path.endswith(".jsonl") for f in files)
    config = text_files.make_config(
        files,
        eval_fraction=float(data_cfg.get("eval_fraction", 0.02)),
        text_key=(data_cfg.get("text_key", "text") or "text") if has_jsonl else "text",
        label=label,
    )
    builder = text_files.prepare(config, _local_data_dir(data_cfg))
    splits = list(builder.info.splits.keys())
    base = split.split("[", 1)[0]
    if base not in splits:
        raise DataError(f"Split {split!r} not in {splits} for data.name={data_cfg.name!r}.")
    return builder.as_data_source(split)


class _ExtractText(grain.transforms.Map):
    """Pulls the text field out of a TFDS example and decodes it to ``str``."""

    def __init__(self, key: str) -> None:
        self._key = key

    def map(self, element: Any) -> str:
        text = element[self._key] if isinstance(element, dict) else element
        if isinstance(text, np.ndarray):
            text = text.item()
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def load_documents(data_cfg: Any, split: str) -> grain.MapDataset:
    """A random-access ``MapDataset`` of document strings for ``data_cfg.name``.

    ``'stdlib'`` and ``'text_files'`` are built into array_record on first use and
    cached under ``data.data_dir`` (default ``$JAXFORMER_DATA_DIR`` or
    ``~/.cache/jaxformer/tfds``). ``'tfds'`` reads a named dataset that must already be
    prepared; there ``data.data_dir=''`` means TFDS's own default directory.
    """
    name = data_cfg.get("name", "stdlib")
    if name == "stdlib":
        source, key = _text_files_source(data_cfg, split, stdlib=True), "text"
    elif name == "text_files":
        source, key = _text_files_source(data_cfg, split, stdlib=False), "text"
    elif name == "tfds":
        source, key = _tfds_source(data_cfg, split), data_cfg.get("text_key", "text")
    else:
        raise DataError(f"Unknown data.name={name!r}; expected 'stdlib', 'text_files' or 'tfds'.")
    if len(source) == 0:
        raise DataError(f"Split {split!r} of data.name={name!r} is empty.")
    return grain.MapDataset.source(source).map(_ExtractText(key))


# ---------------------------------------------------------------------------
# Transforms


class _Tokenize(grain.transforms.Map):
    """``text -> [bos] + encode(text) + [eos]`` as int32."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def map(self, text: str) -> np.ndarray:
        tok = self._tokenizer
        return np.concatenate([[tok.bos_id], tok.encode(text), [tok.eos_id]], dtype=np.int32)


class _ChunkDocument(grain.experimental.FlatMapTransform):
    """Splits ``doc`` into (inputs, targets) chunks of at most ``seq_len`` pairs.

    Chunk i is ``inputs = doc[i*L:(i+1)*L]``, ``targets = doc[i*L+1:(i+1)*L+1]``, so the
    chunks together predict every token after bos exactly once.
    """

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.max_fan_out = 1 << 30  # only FlatMapMapDataset uses it; documents are unbounded

    def flat_map(self, doc: np.ndarray) -> Sequence[dict[str, np.ndarray]]:
        inputs, targets = doc[:-1], doc[1:]
        return [
            {"inputs": inputs[s : s + self.seq_len], "targets": targets[s : s + self.seq_len]}
            for s in range(0, len(inputs), self.seq_len)
        ]


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames grain's packing outputs to the jaxformer batch keys, adds weights."""
    segment_ids = packed["targets_segment_ids"].astype(np.int32)
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": (segment_ids > 0).astype(np.float32),
    }


class _HostSlice(grain.transforms.Map):
    """Pads a short final global batch with empty rows and keeps this host's rows."""

    def __init__(self, global_batch: int, process_index: int, process_count: int) -> None:
        self._global_batch = global_batch
        per_host = global_batch // process_count
        self._rows = slice(process_index * per_host, (process_index + 1) * per_host)

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for key, value in batch.items():
            missing = self._global_batch - value.shape[0]
            if missing:
                value = np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
            out[key] = value[self._rows]
        return out


class _MaskRow(grain.transforms.RandomMap):
    """A packed LM row -> a BERT masked-LM row over the same tokens (the ``inputs``)."""

    def __init__(self, tokenizer: Tokenizer, mask_id: int) -> None:
        self._special = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, mask_id)
        self._vocab_size, self._mask_id = tokenizer.vocab_size, mask_id

    def random_map(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        masked = bert_mask(
            row["inputs"], rng, vocab_size=self._vocab_size, mask_id=self._mask_id,
            special_ids=self._special,
        )  # fmt: skip
        return {**row, **masked}


def _seeds(seed: int, n: int) -> list[int]:
    """Independent 31-bit seeds for each random stage (grain adds epoch/window offsets)."""
    state = np.random.SeedSequence(int(seed)).generate_state(n)
    return [int(s) % 2**31 for s in state]


class RecordSource:
    """Random access over in-memory tuples, each given to grain as a dict of ``keys``:
    the source of the built-in tasks that are generated, not read (reverse_words pairs,
    stdlib_packages examples)."""

    def __init__(self, rows: Sequence[tuple], keys: tuple[str, ...]) -> None:
        self._rows, self._keys = rows, keys

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(zip(self._keys, self._rows[index], strict=True))


def to_iter(records: grain.MapDataset) -> grain.IterDataset:
    """Random-access records -> a stream read ahead by a few threads."""
    threads = max(1, min(8, os.cpu_count() or 1))
    return records.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64))


def check_batching(
    global_batch: int, process_index: int, process_count: int, *lengths: int
) -> None:
    """Rejects batch arithmetic no pipeline can serve, naming the config key."""
    if global_batch <= 0 or min(lengths) <= 0:
        raise DataError(f"Need positive lengths and batch, got {lengths=} {global_batch=}.")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"Bad host index {process_index} of {process_count}.")
    if global_batch % process_count:
        raise DataError(
            f"train.global_batch={global_batch} must be divisible by the number of "
            f"processes ({process_count})."
        )


def batch_and_prefetch(
    rows: grain.IterDataset,
    data_cfg: Any,
    global_batch: int,
    process_index: int,
    process_count: int,
) -> grain.IterDataset:
    """Packed rows -> this host's share of each global batch, prefetched.

    In-process by default (a thread overlaps packing with the training step, and the
    state stays checkpointable); ``data.worker_count > 0`` uses grain worker processes.
    """
    ds = rows.batch(global_batch, drop_remainder=False)
    ds = ds.map(_HostSlice(global_batch, process_index, process_count))
    workers = int(data_cfg.get("worker_count", 0) or 0)
    if workers > 0:
        # grain's worker code reads absl flags; jaxformer's CLI does not use absl.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)


# ---------------------------------------------------------------------------
# The pipeline


def make_dataset(
    data_cfg: Any,
    *,
    split: str,
    seq_len: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    seed: int,
    repeat: bool,
    mlm_mask_id: int | None = None,
) -> grain.IterDataset:
    """The per-host batch stream for ``split`` (iterate it with ``iter(ds)``).

    With ``mlm_mask_id`` (BERT), each packed row is masked for masked-LM instead:
    ``inputs`` hold the corrupted tokens, ``targets`` the original ones and ``weights``
    are 1 exactly at the chosen positions (:func:`jaxformer.data.objectives.bert_mask`,
    drawn afresh every epoch from the row's index and the seed).

    Each element is a dict of numpy arrays of shape ``[global_batch // process_count,
    seq_len]``: ``inputs``/``targets``/``segment_ids``/``positions`` (int32) and
    ``weights`` (float32). Segments are numbered 1, 2, ... within a row (0 = padding),
    positions restart at 0 for every segment, and weights are 1.0 exactly on real
    targets.

    Host sharding: every host runs the same deterministic *global* pipeline and keeps
    rows ``[p * B/P, (p+1) * B/P)`` of each global batch. That costs each host the
    tokenization/packing of the whole global batch (cheap next to a training step),
    but makes the data order a function of the global sample index only, so a run
    can resume on a different number of hosts and see exactly the same data.

    Determinism: the order depends only on ``seed`` (usually ``data.shuffle_seed``),
    the corpus, the tokenizer, ``seq_len`` and ``global_batch``; documents are
    globally reshuffled each epoch when ``repeat`` is true. With
    ``data.worker_count > 0`` grain worker processes each handle a slice of the
    documents, which changes (deterministically) the order; the in-process default
    does not. With ``repeat=False`` the last global batch is padded with empty rows
    (weights 0) so every batch has the same shape and each token appears exactly once.
    """
    check_batching(global_batch, process_index, process_count, seq_len)
    tokenizer = build_tokenizer(data_cfg)
    doc_seed, window_seed, pack_seed = _seeds(seed, 3)

    docs = load_documents(data_cfg, split).shuffle(seed=doc_seed)
    if repeat:
        docs = docs.repeat(None)  # grain reseeds the shuffle for every epoch
    docs = docs.map(_Tokenize(tokenizer))
    ds = to_iter(docs)
    ds = grain.experimental.FlatMapIterDataset(ds, _ChunkDocument(seq_len))
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=max(_MIN_SHUFFLE_WINDOW, 4 * global_batch), seed=window_seed
    )
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"inputs": seq_len, "targets": seq_len},
        # Rows packed at once; more bins = less padding but bigger buffers.
        num_packing_bins=min(max(16, global_batch), 128),
        seed=pack_seed,
        shuffle_bins=True,
    )
    ds = ds.map(_to_row)
    if mlm_mask_id is not None:
        ds = ds.random_map(_MaskRow(tokenizer, mlm_mask_id), seed=pack_seed + 1)
    return batch_and_prefetch(ds, data_cfg, global_batch, process_index, process_count)


# ---------------------------------------------------------------------------
# Bits per byte


def count_target_bytes(batch: dict[str, np.ndarray], tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of text predicted by the weighted targets of ``batch``.

    Byte tokenizer: one byte per non-special target. SentencePiece: each piece's
    decoded length (byte-fallback pieces count one byte). Batches whose targets are
    sequence labels (``[B, 1]``, classification) predict no text: 0. Use with
    :func:`bits_per_byte`.
    """
    targets = np.asarray(batch["targets"])
    if targets.shape != np.asarray(batch["inputs"]).shape:
        return 0  # sequence labels (classification), not text
    mask = np.asarray(batch["weights"]) > 0
    table = tokenizer.token_bytes
    return int(np.sum(table[np.clip(targets, 0, len(table) - 1)] * mask, dtype=np.int64))


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """Tokenizer-independent eval metric: summed token NLL (nats) / ln 2 / text bytes.

    Equivalently ``mean_loss_per_token / ln 2 * tokens / bytes``.
    """
    return float(total_nll_nats) / math.log(2.0) / max(int(total_bytes), 1)
