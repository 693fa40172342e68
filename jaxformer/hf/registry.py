"""Every Hugging Face model type a checkpoint directory can hold, listed explicitly.

The model type modules know nothing of directories and of each other, so this module can
import them all plainly; :mod:`jaxformer.hf.checkpoint_dir` looks model types up here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from jaxformer.hf import bert, decoder, t5
from jaxformer.hf.model_type import HFModelType
from jaxformer.model import T5, Bert, DecoderLM

# By config.json's model_type.
MODEL_TYPES: dict[str, HFModelType] = {
    mt.name: mt for mt in (decoder.HF_GPT2, decoder.HF_LLAMA, bert.HF_BERT, t5.HF_T5)
}

CONFIG_FILE = "config.json"


def model_type_of_hf_config(hf_config: Mapping[str, Any], where: str = CONFIG_FILE) -> HFModelType:
    """The :class:`HFModelType` of a config.json dict (by ``model_type``)."""
    name = hf_config.get("model_type")
    if name not in MODEL_TYPES:
        raise ValueError(
            f"'{where}' has model_type {name!r}; jaxformer reads {sorted(MODEL_TYPES)}"
        )
    return MODEL_TYPES[name]


def model_type_of_model(model: nnx.Module) -> HFModelType:
    """The :class:`HFModelType` that holds a jaxformer model exactly (raises ValueError
    naming ``model.KEY`` if none does). Chosen by the model's class, then checked by the
    model type's export."""
    if isinstance(model, DecoderLM):
        return MODEL_TYPES[decoder.model_type_of(model.cfg)]
    if isinstance(model, Bert):
        return bert.HF_BERT
    if isinstance(model, T5):
        return t5.HF_T5
    raise ValueError(
        f"a {type(model).__name__} has no Hugging Face model type (jaxformer maps "
        f"{', '.join(mt.task.model_class.__name__ for mt in MODEL_TYPES.values())})"
    )


__all__ = ["CONFIG_FILE", "MODEL_TYPES", "model_type_of_hf_config", "model_type_of_model"]
