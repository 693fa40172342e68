"""The original encoder-decoder Transformer (Vaswani et al.) on source/target pairs."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from jaxformer import data as jdata
from jaxformer import decode, flops
from jaxformer.data.seq2seq import ENCODER_KEYS
from jaxformer.model import EncoderDecoder
from jaxformer.tasks.base import Task, hosts, unpacked_row

# Keys only decoders, BERT or T5 read (scan_layers is refused by Task.validate).
_NOT_ENCODER_DECODER = (
    "model.type_vocab_size",
    "model.relative_buckets",
    "model.relative_max_distance",
    "model.sliding_window",
    "model.moe_experts",
)


@dataclasses.dataclass(frozen=True)
class Seq2SeqTask(Task):
    """What encoder-decoders share: pair batches, FLOPs of both stacks, generation and
    attention maps from a source."""

    seq2seq: bool = True

    def count_flops(self, model_cfg: Any, seq_len: int) -> flops.FlopCount:
        return flops.with_encoder(
            flops.count(model_cfg, seq_len), model_cfg, seq_len, relative_bias=False
        )

    def batch_lengths(self, cfg: ml_collections.ConfigDict) -> dict[str, int]:
        source = cfg.data.source_seq_len or cfg.data.seq_len
        return super().batch_lengths(cfg) | {key: source for key in ENCODER_KEYS}

    def generation_inputs(
        self, tokenizer: Any, text: np.ndarray
    ) -> tuple[np.ndarray, tuple[np.ndarray, None]]:
        """The text is the source (ended by eos, as in training); the decoder starts at bos."""
        source = np.append(text, tokenizer.eos_id).astype(np.int32)
        return np.asarray([tokenizer.bos_id], np.int32), (source[None], None)

    def text_row(self, tokenizer: Any, text: np.ndarray) -> dict[str, np.ndarray]:
        """The encoder's row for ``text`` as source (``encoder_*`` keys)."""
        source = np.append(text, tokenizer.eos_id).astype(np.int32)
        return {f"encoder_{k}": v for k, v in unpacked_row(source).items()}


@dataclasses.dataclass(frozen=True)
class EncoderDecoderTask(Seq2SeqTask):
    """``model.family = "encoder_decoder"``: translation-style pairs, BLEU at evaluation."""

    name: str = "encoder_decoder"
    model_class: type[nnx.Module] = EncoderDecoder
    trains_on_pairs: bool = True
    ignored_keys: tuple[str, ...] = _NOT_ENCODER_DECODER

    def dataset(self, cfg: ml_collections.ConfigDict, split: str, repeat: bool) -> Any:
        return jdata.make_seq2seq_dataset(
            cfg.data, split=split, source_len=cfg.data.source_seq_len or cfg.data.seq_len,
            target_len=cfg.data.seq_len, **hosts(cfg, repeat),
        )  # fmt: skip

    def extra_metrics(
        self, cfg: ml_collections.ConfigDict, model: nnx.Module, tokenizer: Any, step: int
    ) -> dict[str, float]:
        """BLEU of greedy translations after step 0 (at step 0 every row would decode to
        the length cap, for a BLEU of 0)."""
        if cfg.train.bleu_samples <= 0 or not step:
            return {}
        return {"bleu": bleu(cfg, model, tokenizer, cfg.train.bleu_samples)}


def bleu(cfg: ml_collections.ConfigDict, model: nnx.Module, tokenizer: Any, samples: int) -> float:
    """Corpus BLEU of greedy translations (on the KV cache) of the first ``samples``
    held-out sources."""
    source_len = cfg.data.source_seq_len or cfg.data.seq_len
    pairs = jdata.load_pairs(
        cfg.data, cfg.data.eval_split, max_chars=min(source_len, cfg.data.seq_len) - 1
    )
    pairs = [pairs[i] for i in range(min(samples, len(pairs)))]
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
        out = decode.translate(
            model, sources, sources > 0, max_new_tokens=steps,
            start_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        )  # fmt: skip
        hypotheses += jdata.decode_batch(np.asarray(out), tokenizer)[: len(chunk)]
    return jdata.corpus_bleu(hypotheses, [p["target"] for p in pairs])


ENCODER_DECODER = EncoderDecoderTask()
