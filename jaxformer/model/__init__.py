"""Model code: math and logical axis names only, no mesh axes."""

from jaxformer.model.decoder import DecoderLM, ModelConfig, count_params

__all__ = ["DecoderLM", "ModelConfig", "count_params"]
