"""Model code: math and logical axis names only, no mesh axes.

Which class a config builds, with which attention backend, is decided by the family's
task (``jaxformer/tasks/``), not here.
"""

import jax
from flax import nnx

from jaxformer.model.bert import Bert
from jaxformer.model.config import ModelConfig
from jaxformer.model.decoder import DecoderLM, count_params
from jaxformer.model.encoder_decoder import EncoderDecoder
from jaxformer.model.t5 import T5

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
    "ModelConfig",
    "T5",
    "capture_intermediates",
    "count_params",
]
