"""Model code: math and logical axis names only, no mesh axes."""

from typing import Any

from flax import nnx

from jaxformer.model.bert import Bert
from jaxformer.model.decoder import DecoderLM, ModelConfig, count_params
from jaxformer.model.encoder_decoder import EncoderDecoder
from jaxformer.model.t5 import T5

FAMILIES = {"decoder": DecoderLM, "encoder_decoder": EncoderDecoder, "bert": Bert, "t5": T5}


def build_model(model_cfg: Any, seed: int) -> nnx.Module:
    """The model ``model_cfg.family`` names, with parameters drawn from ``seed``."""
    cfg = ModelConfig.from_config(model_cfg)
    return FAMILIES[cfg.family](cfg, nnx.Rngs(params=seed))


__all__ = [
    "Bert",
    "DecoderLM",
    "EncoderDecoder",
    "FAMILIES",
    "ModelConfig",
    "T5",
    "build_model",
    "count_params",
]
