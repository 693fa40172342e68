"""T5 (Raffel et al.): an encoder-decoder pre-trained by span corruption of plain text."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from flax import nnx

from jaxformer import data as jdata
from jaxformer import flops
from jaxformer.model import T5
from jaxformer.tasks.base import hosts
from jaxformer.tasks.encoder_decoder import Seq2SeqTask

SENTINELS = 100  # T5's <extra_id_0..99>

_NOT_T5 = (
    "model.type_vocab_size",
    "model.sliding_window",
    "model.moe_experts",
    "train.bleu_samples",
)


@dataclasses.dataclass(frozen=True)
class T5Task(Seq2SeqTask):
    """``model.family = "t5"``: relative position bias, span-corruption batches whose
    100 sentinel ids take the last ids of the vocabulary."""

    name: str = "t5"
    model_class: type[nnx.Module] = T5
    reserved_ids: int = SENTINELS
    reserved_what: str = " plus 100 sentinels"
    ignored_keys: tuple[str, ...] = _NOT_T5

    def count_flops(self, model_cfg: Any, seq_len: int) -> flops.FlopCount:
        return flops.with_encoder(
            flops.count(model_cfg, seq_len), model_cfg, seq_len, relative_bias=True
        )

    def dataset(self, cfg: ml_collections.ConfigDict, split: str, repeat: bool) -> Any:
        # Sentinels count down from the last id, as T5's <extra_id_0> = 32099 of 32128 does.
        return jdata.make_span_corruption_dataset(
            cfg.data, split=split, source_len=cfg.data.source_seq_len or cfg.data.seq_len,
            target_len=cfg.data.seq_len, first_sentinel_id=cfg.model.vocab_size - 1,
            **hosts(cfg, repeat),
        )  # fmt: skip


T5_SPAN_CORRUPTION = T5Task()
