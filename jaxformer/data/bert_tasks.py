"""BERT's sentence-level data: next-sentence-prediction pairs and sequence classification.

Both build one example per row, ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``, padded
to ``seq_len`` (the pooler reads each row's first token, so rows are not packed), with
``token_type_ids`` 0 on ``[CLS] A [SEP]`` and 1 on ``B [SEP]``. ``[CLS]`` and ``[SEP]`` are
the tokenizer's bos and eos, as in the masked-LM rows of :mod:`jaxformer.data.lm_dataset`
(a packed document is ``[bos] text [eos]``), and ``[MASK]`` is the first id after the
tokenizer's vocabulary.

* :func:`make_nsp_dataset` (``data.nsp=True``): documents are cut into spans of whole
  lines; A is a span, and B is the span after it (label 0, "IsNext", Hugging Face's
  convention) or, with probability 1/2, a span of a random other document (label 1).
  Masked LM is drawn on top (:func:`jaxformer.data.objectives.bert_mask`). The coin, the
  other document and the masks are grain random maps, so they are redrawn every epoch yet
  fixed by the seed and the epoch, and resume exactly from the iterator state.
* :func:`make_classification_dataset` (``model.num_labels > 0``): ``targets`` are each
  row's label ``[B, 1]``, matching the classifier's ``[B, 1, C]`` logits, so the train
  step's token cross-entropy is the classification loss and its accuracy the accuracy.
  Sources: the built-in ``stdlib_packages`` task (:func:`stdlib_package_examples`) or a
  prepared TFDS dataset with ``data.text_key``, ``data.label_key`` and optionally
  ``data.text_pair_key`` (e.g. ``glue/sst2``: ``sentence`` / ``label``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import grain
import numpy as np

from jaxformer.data import text_files
from jaxformer.data.lm_dataset import (
    _MIN_SHUFFLE_WINDOW,
    RecordSource,
    _MaskRow,
    _seeds,
    _tfds_source,
    batch_and_prefetch,
    check_batching,
    load_documents,
    to_iter,
)
from jaxformer.data.tokenizers import Tokenizer, build_tokenizer
from jaxformer.errors import DataError

logger = logging.getLogger(__name__)

IS_NEXT, NOT_NEXT = 0, 1  # next_sentence_label as Hugging Face's BertForPreTraining
# The built-in classification task: which of these stdlib packages a span of code is from.
PACKAGES = ("asyncio", "email", "tkinter", "unittest")
_MIN_SPAN_CHARS = 16  # non-whitespace characters a classification span needs
_BALANCE_SEED = 20240917  # fixed: the balanced subset must not depend on the run's seed


# ---------------------------------------------------------------------------
# Rows


def bert_row(
    a: np.ndarray, b: np.ndarray | None, seq_len: int, *, cls_id: int, sep_id: int
) -> dict[str, np.ndarray]:
    """``[CLS] a [SEP] (b [SEP])`` padded to ``seq_len``: ``inputs``, ``segment_ids`` (1 on
    real tokens), ``positions`` and ``token_type_ids`` (1 on ``b [SEP]``), all int32.

    Too long a pair loses tokens from the end of the longer text, one at a time, as
    BERT's ``truncate_seq_pair``.
    """
    a, b = np.asarray(a, np.int32), None if b is None else np.asarray(b, np.int32)
    budget = seq_len - (2 if b is None else 3)
    if budget < 2:
        raise DataError(f"data.seq_len={seq_len} leaves no room for text after [CLS]/[SEP].")
    len_a, len_b = len(a), 0 if b is None else len(b)
    while len_a + len_b > budget:
        if len_a >= len_b:
            len_a -= 1
        else:
            len_b -= 1
    parts = [[cls_id], a[:len_a], [sep_id]]
    types = [np.zeros(len_a + 2, np.int32)]
    if b is not None:
        parts += [b[:len_b], [sep_id]]
        types.append(np.ones(len_b + 1, np.int32))
    tokens = np.concatenate(parts).astype(np.int32)
    n = len(tokens)
    pad = seq_len - n
    return {
        "inputs": np.pad(tokens, (0, pad)),
        "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
        "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
        "token_type_ids": np.pad(np.concatenate(types), (0, pad)),
    }


def line_spans(text: str, tokenizer: Tokenizer, span_len: int) -> list[np.ndarray]:
    """``text`` as consecutive spans of whole lines of at most ``span_len`` tokens each
    (a longer line is cut), covering every token once: code's sentences are its lines."""
    spans: list[np.ndarray] = []
    pieces: list[np.ndarray] = []
    size = 0
    for line in text.splitlines(keepends=True):
        ids = tokenizer.encode(line)
        for start in range(0, len(ids), span_len):
            piece = ids[start : start + span_len]
            if size + len(piece) > span_len:
                spans.append(np.concatenate(pieces))
                pieces, size = [], 0
            pieces.append(piece)
            size += len(piece)
    if pieces:
        spans.append(np.concatenate(pieces))
    return spans


# ---------------------------------------------------------------------------
# Next-sentence prediction


class _DocumentSpans(grain.transforms.Map):
    """Document index -> its line spans (the index says which document B must avoid)."""

    def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, span_len: int) -> None:
        self._docs, self._tokenizer, self._span_len = docs, tokenizer, span_len

    def map(self, index: int) -> dict[str, Any]:
        text = self._docs[int(index)]
        return {"doc": int(index), "spans": line_spans(text, self._tokenizer, self._span_len)}


class _ConsecutiveSpans(grain.experimental.FlatMapTransform):
    """A document's spans -> every (span, next span) pair of it."""

    def __init__(self) -> None:
        self.max_fan_out = 1 << 30  # only FlatMapMapDataset uses it; documents are unbounded

    def flat_map(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        spans = doc["spans"]
        return [{"doc": doc["doc"], "a": a, "b": b} for a, b in zip(spans, spans[1:], strict=False)]


class _NextOrRandom(grain.transforms.RandomMap):
    """Keeps B (IsNext) or, with probability 1/2, replaces it by a random span of a
    random other document (NotNext), as Devlin et al."""

    def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, span_len: int) -> None:
        self._spans = _DocumentSpans(docs, tokenizer, span_len)
        self._count = len(docs)

    def random_map(self, pair: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self._count < 2 or rng.random() < 0.5:
            return {"a": pair["a"], "b": pair["b"], "label": IS_NEXT}
        for _ in range(10):  # documents without text have no spans: draw again
            other = int(rng.integers(self._count - 1))
            other += other >= pair["doc"]  # uniform over the other documents
            spans = self._spans.map(other)["spans"]
            if spans:
                b = spans[int(rng.integers(len(spans)))]
                return {"a": pair["a"], "b": b, "label": NOT_NEXT}
        return {"a": pair["a"], "b": pair["b"], "label": IS_NEXT}


class _NspRow(grain.transforms.Map):
    """A labelled pair -> a ``[CLS] A [SEP] B [SEP]`` row with ``nsp_targets``/``nsp_weights``."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int) -> None:
        self._cls, self._sep, self._seq_len = tokenizer.bos_id, tokenizer.eos_id, seq_len

    def map(self, pair: dict[str, Any]) -> dict[str, np.ndarray]:
        row = bert_row(pair["a"], pair["b"], self._seq_len, cls_id=self._cls, sep_id=self._sep)
        row["nsp_targets"] = np.array([pair["label"]], np.int32)
        row["nsp_weights"] = np.ones(1, np.float32)
        return row


def make_nsp_dataset(
    data_cfg: Any,
    *,
    split: str,
    seq_len: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    seed: int,
    repeat: bool,
    mask_id: int,
) -> grain.IterDataset:
    """BERT pre-training batches: masked LM on ``[CLS] A [SEP] B [SEP]`` rows plus NSP.

    Spans are at most ``(seq_len - 3) // 2`` tokens, so a pair always fits. Each element
    is a dict of ``[global_batch // process_count, ...]`` numpy arrays: the masked-LM
    ``inputs``/``targets``/``weights`` of :func:`jaxformer.data.make_dataset`,
    ``segment_ids``, ``positions``, ``token_type_ids`` (``[B, seq_len]``) and
    ``nsp_targets`` (0 IsNext, 1 NotNext) / ``nsp_weights`` (``[B, 1]``; 0 on the padding
    rows of a final eval batch). Documents are reshuffled every epoch with ``repeat``.
    """
    check_batching(global_batch, process_index, process_count, seq_len)
    span_len = (seq_len - 3) // 2
    if span_len < 1:
        raise DataError(f"data.seq_len={seq_len} is too short for next-sentence pairs.")
    tokenizer = build_tokenizer(data_cfg)
    doc_seed, pair_seed, window_seed, mask_seed = _seeds(seed, 4)
    docs = load_documents(data_cfg, split)
    order = grain.MapDataset.range(len(docs)).shuffle(seed=doc_seed)
    if repeat:
        order = order.repeat(None)  # grain reseeds the shuffle for every epoch
    ds = to_iter(order.map(_DocumentSpans(docs, tokenizer, span_len)))
    ds = grain.experimental.FlatMapIterDataset(ds, _ConsecutiveSpans())
    ds = ds.random_map(_NextOrRandom(docs, tokenizer, span_len), seed=pair_seed)
    # Consecutive pairs come from one document: mix many documents into each batch.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=max(_MIN_SHUFFLE_WINDOW, 4 * global_batch), seed=window_seed
    )
    ds = ds.map(_NspRow(tokenizer, seq_len))
    ds = ds.random_map(_MaskRow(tokenizer, mask_id), seed=mask_seed)
    return batch_and_prefetch(ds, data_cfg, global_batch, process_index, process_count)


# ---------------------------------------------------------------------------
# Sequence classification


def _package_of(key: str) -> int | None:
    top = key.split("/", 1)[0]
    return PACKAGES.index(top) if top in PACKAGES else None


def _text_spans(text: str, max_chars: int) -> list[str]:
    """Consecutive spans of whole lines of at most ``max_chars`` characters (longer lines
    are cut) with at least ``_MIN_SPAN_CHARS`` non-whitespace characters."""
    spans, lines, size = [], [], 0
    for line in text.splitlines():
        line = line.rstrip()[:max_chars]
        if lines and size + len(line) + 1 > max_chars:
            spans.append("\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line) + 1
    if lines:
        spans.append("\n".join(lines))
    return [s for s in spans if len("".join(s.split())) >= _MIN_SPAN_CHARS]


@functools.lru_cache(maxsize=8)
def stdlib_package_examples(
    eval_fraction: float, split: str, max_chars: int
) -> tuple[tuple[str, int], ...]:
    """The built-in ``stdlib_packages`` task: (span of code, package) pairs.

    Every ``*.py`` file under the stdlib packages :data:`PACKAGES` is cut into spans of
    whole lines of at most ``max_chars`` characters; the label is the package's index.
    Files, not spans, are split (hash of the file's path below ``eval_fraction`` =
    ``eval``, as the stdlib corpus), so no held-out span shares a file with a training
    one; each package keeps at least one file on each side. Each split is balanced by
    subsampling every package to the smallest one's count (fixed seed), so chance is
    ``1 / len(PACKAGES)``.
    """
    base = split.split("[", 1)[0]
    if base not in ("train", "eval"):
        raise DataError(
            f"data.name='stdlib_packages' has splits 'train' and 'eval', not {split!r}."
        )
    files: dict[int, list[tuple[float, text_files.SourceFile]]] = {}
    for f in text_files.stdlib_files():
        label = _package_of(f.key)
        if label is not None:
            files.setdefault(label, []).append((text_files._unit_hash(f.key), f))
    if len(files) != len(PACKAGES):
        missing = [p for i, p in enumerate(PACKAGES) if i not in files]
        raise DataError(f"stdlib_packages: this interpreter's stdlib lacks {missing}.")
    per_label: list[list[str]] = []
    for label in range(len(PACKAGES)):
        ranked = sorted(files[label], key=lambda hf: hf[0])
        held_out = max(1, min(len(ranked) - 1, sum(h < eval_fraction for h, _ in ranked)))
        chosen = ranked[:held_out] if base == "eval" else ranked[held_out:]
        spans = []
        for _, f in sorted(chosen, key=lambda hf: hf[1].key):
            with open(f.path, "rb") as fh:
                spans += _text_spans(fh.read().decode("utf-8", errors="replace"), max_chars)
        per_label.append(spans)
    smallest = min(len(s) for s in per_label)
    rng = np.random.default_rng(_BALANCE_SEED)
    examples = []
    for label, spans in enumerate(per_label):
        keep = np.sort(rng.choice(len(spans), smallest, replace=False))
        examples += [(spans[i], label) for i in keep]
    found = ", ".join(f"{p} {len(s)}" for p, s in zip(PACKAGES, per_label, strict=True))
    logger.info(
        "stdlib_packages %s: %d spans per package (of %s), at most %d characters each",
        split, smallest, found, max_chars,
    )  # fmt: skip
    return tuple(examples)


def _as_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class _ExtractExample(grain.transforms.Map):
    """A TFDS example -> ``{"text", "text_pair", "label"}``."""

    def __init__(self, text_key: str, label_key: str, text_pair_key: str) -> None:
        self._keys = (text_key, label_key, text_pair_key)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        text_key, label_key, pair_key = self._keys
        pair = _as_text(element[pair_key]) if pair_key else None
        return {"text": _as_text(element[text_key]), "text_pair": pair,
                "label": int(element[label_key])}  # fmt: skip


def _tfds_examples(data_cfg: Any, split: str, num_labels: int) -> grain.MapDataset:
    # Legacy text classification builders (glue, imdb_reviews, ...) register only when
    # their module is imported; it does not import TensorFlow.
    import tensorflow_datasets.text  # noqa: F401, PLC0415

    source = _tfds_source(data_cfg, split)  # MissingDataError if not prepared
    features = source.dataset_info.features
    names = sorted(features.keys()) if hasattr(features, "keys") else []
    keys = {
        "data.text_key": data_cfg.get("text_key", "text"),
        "data.label_key": data_cfg.get("label_key", ""),
        "data.text_pair_key": data_cfg.get("text_pair_key", ""),
    }
    for config_key, key in keys.items():
        if (key or config_key != "data.text_pair_key") and key not in names:
            raise DataError(
                f"{config_key}={key!r} must name a feature of TFDS dataset "
                f"{data_cfg.tfds_name!r} (data.tfds_name); it has {names}."
            )
    classes = getattr(features[keys["data.label_key"]], "num_classes", None)
    if classes is not None and classes != num_labels:
        raise DataError(
            f"model.num_labels={num_labels} but {data_cfg.tfds_name!r} feature "
            f"{keys['data.label_key']!r} has {classes} classes; set model.num_labels={classes}."
        )
    if len(source) == 0:
        raise DataError(f"Split {split!r} of data.tfds_name={data_cfg.tfds_name!r} is empty.")
    return grain.MapDataset.source(source).map(_ExtractExample(*keys.values()))


def load_examples(
    data_cfg: Any, split: str, *, num_labels: int, max_chars: int
) -> grain.MapDataset:
    """A random-access ``MapDataset`` of ``{"text", "text_pair", "label"}`` for ``split``
    (``text_pair`` is None for single-text tasks; a negative label means unlabelled, as
    GLUE's test splits, and gets weight 0)."""
    name = data_cfg.get("name", "")
    if name == "stdlib_packages":
        if num_labels != len(PACKAGES):
            raise DataError(
                f"model.num_labels={num_labels} but stdlib_packages has {len(PACKAGES)} "
                f"classes {PACKAGES}; set model.num_labels={len(PACKAGES)}."
            )
        examples = stdlib_package_examples(
            float(data_cfg.get("eval_fraction", 0.02)), split, max_chars
        )
        rows = [(text, None, label) for text, label in examples]
        return grain.MapDataset.source(RecordSource(rows, ("text", "text_pair", "label")))
    if name == "tfds":
        return _tfds_examples(data_cfg, split, num_labels)
    raise DataError(
        f"data.name={name!r} has no labels; classification (model.num_labels > 0) needs "
        "data.name='stdlib_packages' or 'tfds' with data.label_key."
    )


class _ClassifyRow(grain.transforms.Map):
    """``{"text", "text_pair", "label"}`` -> a ``[CLS] A [SEP] (B [SEP])`` row with the
    label as a ``[1]`` target."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, num_labels: int) -> None:
        self._tokenizer, self._seq_len, self._num_labels = tokenizer, seq_len, num_labels

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        tok, label = self._tokenizer, int(example["label"])
        if label >= self._num_labels:
            raise DataError(
                f"label {label} is out of range for model.num_labels={self._num_labels}."
            )
        pair = example["text_pair"]
        row = bert_row(
            tok.encode(example["text"]), None if pair is None else tok.encode(pair),
            self._seq_len, cls_id=tok.bos_id, sep_id=tok.eos_id,
        )  # fmt: skip
        row["targets"] = np.array([max(label, 0)], np.int32)
        row["weights"] = np.array([float(label >= 0)], np.float32)
        return row


def make_classification_dataset(
    data_cfg: Any,
    *,
    split: str,
    seq_len: int,
    num_labels: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    seed: int,
    repeat: bool,
) -> grain.IterDataset:
    """Sequence-classification batches: one example per row.

    Each element is a dict of ``[global_batch // process_count, ...]`` numpy arrays:
    ``inputs``, ``segment_ids``, ``positions``, ``token_type_ids`` (``[B, seq_len]``),
    ``targets`` (the label) and ``weights`` (``[B, 1]``; 0 for unlabelled examples and the
    padding rows of a final eval batch). Examples are reshuffled every epoch with
    ``repeat``.
    """
    check_batching(global_batch, process_index, process_count, seq_len)
    tokenizer = build_tokenizer(data_cfg)
    (order_seed,) = _seeds(seed, 1)
    examples = load_examples(data_cfg, split, num_labels=num_labels, max_chars=seq_len - 2)
    examples = examples.shuffle(seed=order_seed)
    if repeat:
        examples = examples.repeat(None)
    ds = to_iter(examples.map(_ClassifyRow(tokenizer, seq_len, num_labels)))
    return batch_and_prefetch(ds, data_cfg, global_batch, process_index, process_count)
