"""GPT- and LLaMA-style decoder language models: next-token prediction on plain text."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxformer.losses import chunked_cross_entropy
from jaxformer.model import DecoderLM
from jaxformer.tasks.base import Batch, Stats, Task

# Keys only encoder-decoders, BERT or T5 read.
_NOT_DECODER = (
    "model.num_encoder_layers",
    "model.type_vocab_size",
    "model.relative_buckets",
    "model.relative_max_distance",
    "data.source_seq_len",
    "train.bleu_samples",
)


@dataclasses.dataclass(frozen=True)
class DecoderLMTask(Task):
    """``model.family = "decoder"``: the one family with pipeline stages, unrolled layers,
    the splash kernel and a loss computed a chunk of positions at a time."""

    name: str = "decoder"
    model_class: type[nnx.Module] = DecoderLM
    causal_lm: bool = True
    pipelines: bool = True
    unrolls_layers: bool = True
    ignored_keys: tuple[str, ...] = _NOT_DECODER

    def token_loss(
        self, model: nnx.Module, batch: Batch, key: jax.Array | None, train_cfg: Any
    ) -> tuple[jax.Array, Stats, dict[str, Any]]:
        """With ``train.loss_chunk``, the logits a chunk at a time, never whole."""
        if not train_cfg.loss_chunk:
            return super().token_loss(model, batch, key, train_cfg)
        hidden, aux = model.apply_batch(batch, key, return_hidden=True)
        loss, stats = chunked_cross_entropy(
            hidden, model.output_logits, batch["targets"], batch["weights"],
            chunk=train_cfg.loss_chunk, label_smoothing=train_cfg.label_smoothing,
            z_loss=train_cfg.z_loss,
        )  # fmt: skip
        return loss, stats, aux

    def eval_stats(
        self, model: nnx.Module, batch: Batch, train_cfg: Any
    ) -> tuple[Stats, dict[str, Any]]:
        if not train_cfg.loss_chunk:
            return super().eval_stats(model, batch, train_cfg)
        hidden, aux = model.apply_batch(batch, return_hidden=True)
        _, stats = chunked_cross_entropy(
            hidden, model.output_logits, batch["targets"], batch["weights"],
            chunk=train_cfg.loss_chunk,
        )  # fmt: skip
        return stats, aux


DECODER_LM = DecoderLMTask()
