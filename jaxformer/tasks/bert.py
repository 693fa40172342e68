"""BERT (Devlin et al.): masked LM, next-sentence prediction, sequence classification."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from jaxformer import data as jdata
from jaxformer import flops
from jaxformer.attention.reference import EINSUM, Einsum
from jaxformer.model import Bert, ModelConfig
from jaxformer.tasks.base import Task, hosts

_NOT_BERT = (
    "model.num_encoder_layers",
    "model.relative_buckets",
    "model.relative_max_distance",
    "model.sliding_window",
    "model.moe_experts",
    "data.source_seq_len",
    "train.bleu_samples",
)


@dataclasses.dataclass(frozen=True)
class BertTask(Task):
    """``model.family = "bert"``: a bidirectional encoder whose objective the config
    picks: masked LM on packed text, plus next-sentence prediction on sentence pairs
    (``data.nsp``), or a classifier (``model.num_labels > 0``) on labelled examples."""

    name: str = "bert"
    model_class: type[nnx.Module] = Bert
    classifies: bool = True
    next_sentence: bool = True
    generates: bool = False
    reserved_ids: int = 1  # [MASK], the first id after the tokenizer's vocabulary
    reserved_what: str = " plus [MASK]"
    ignored_keys: tuple[str, ...] = _NOT_BERT

    def build_model(
        self, model_cfg: ml_collections.ConfigDict, seed: int, attention: Einsum = EINSUM
    ) -> nnx.Module:
        """A sequence classifier when ``model.num_labels > 0``."""
        cfg = ModelConfig.from_config(model_cfg, attention)
        return Bert(cfg, nnx.Rngs(params=seed), num_labels=model_cfg.get("num_labels", 0))

    def count_flops(self, model_cfg: Any, seq_len: int) -> flops.FlopCount:
        return flops.with_bert_heads(flops.count(model_cfg, seq_len), model_cfg)

    def dataset(self, cfg: ml_collections.ConfigDict, split: str, repeat: bool) -> Any:
        if cfg.model.num_labels > 0:  # fine-tuning: one labelled example per row
            return jdata.make_classification_dataset(
                cfg.data, split=split, seq_len=cfg.data.seq_len,
                num_labels=cfg.model.num_labels, **hosts(cfg, repeat),
            )  # fmt: skip
        mask_id = jdata.build_tokenizer(cfg.data).vocab_size
        if cfg.data.nsp:  # pre-training on sentence pairs: masked LM + next-sentence
            return jdata.make_nsp_dataset(
                cfg.data, split=split, seq_len=cfg.data.seq_len, mask_id=mask_id,
                **hosts(cfg, repeat),
            )  # fmt: skip
        return jdata.make_dataset(
            cfg.data, split=split, seq_len=cfg.data.seq_len, mlm_mask_id=mask_id,
            **hosts(cfg, repeat),
        )  # fmt: skip

    def batch_lengths(self, cfg: ml_collections.ConfigDict) -> dict[str, int]:
        lengths = super().batch_lengths(cfg)
        length = cfg.data.seq_len
        if cfg.model.num_labels > 0:  # one label per row
            return lengths | {"token_type_ids": length, "targets": 1, "weights": 1}
        if cfg.data.nsp:
            return lengths | {"token_type_ids": length, "nsp_targets": 1, "nsp_weights": 1}
        return lengths

    def text_row(self, tokenizer: Any, text: np.ndarray) -> dict[str, np.ndarray]:
        """``[CLS] text [SEP]`` (the tokenizer's bos and eos), all of segment A."""
        row = super().text_row(tokenizer, np.append(text, tokenizer.eos_id))
        return row | {"token_type_ids": np.zeros_like(row["inputs"])}


BERT = BertTask()
