"""Model code: math and logical axis names only, no mesh axes."""

from typing import Any

from flax import nnx

from jaxformer.model.decoder import DecoderLM, ModelConfig, count_params
from jaxformer.model.encoder_decoder import EncoderDecoder

FAMILIES = {"decoder": DecoderLM, "encoder_decoder": EncoderDecoder}


def build_model(model_cfg: Any, seed: int) -> DecoderLM | EncoderDecoder:
    """The model ``model_cfg.family`` names, with parameters drawn from ``seed``."""
    cfg = ModelConfig.from_config(model_cfg)
    return FAMILIES[cfg.family](cfg, nnx.Rngs(params=seed))


__all__ = ["DecoderLM", "EncoderDecoder", "FAMILIES", "ModelConfig", "build_model", "count_params"]
