"""Model code: math and logical axis names only, no mesh axes."""

from typing import Any

import jax
from flax import nnx

from jaxformer.model.bert import Bert
from jaxformer.model.decoder import DecoderLM, ModelConfig, count_params
from jaxformer.model.encoder_decoder import EncoderDecoder
from jaxformer.model.t5 import T5

FAMILIES = {"decoder": DecoderLM, "encoder_decoder": EncoderDecoder, "bert": Bert, "t5": T5}


def build_model(model_cfg: Any, seed: int) -> nnx.Module:
    """The model ``model_cfg.family`` names, with parameters drawn from ``seed``."""
    cfg = ModelConfig.from_config(model_cfg)
    if cfg.family == "bert":  # a sequence classifier when model.num_labels > 0
        return Bert(cfg, nnx.Rngs(params=seed), num_labels=model_cfg.get("num_labels", 0))
    return FAMILIES[cfg.family](cfg, nnx.Rngs(params=seed))


INTERMEDIATE_SUFFIXES = ("hidden_states", "attention")


@nnx.jit
def _capture(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    return model.apply_batch(batch, capture=True)


def capture_intermediates(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The logits, per-layer attention probabilities and hidden states of any family for
    ``batch`` (a training batch's model inputs), without dropout.

    Hidden states follow Hugging Face's ``output_hidden_states``: ``[N + 1, B, L, D]``,
    every layer's input, then the stack's output after its final norm (if any).
    Attention probabilities are float32 ``[N, B, H, L, S]``. Keys: ``hidden_states`` and
    ``attention`` (decoder-only, BERT); ``encoder_`` and ``decoder_`` ones of each plus
    ``decoder_cross_attention`` (encoder-decoder, T5). Capturing is a static flag of
    ``apply_batch``: the training step never sets it, so it costs nothing there.
    """
    logits, aux = _capture(model, batch)
    captured = {k: v for k, v in aux.items() if k.endswith(INTERMEDIATE_SUFFIXES)}
    return {"logits": logits, **captured}


__all__ = [
    "Bert",
    "DecoderLM",
    "EncoderDecoder",
    "FAMILIES",
    "ModelConfig",
    "T5",
    "build_model",
    "capture_intermediates",
    "count_params",
]
