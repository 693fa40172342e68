"""Hugging Face interop: GPT-2, LLaMA, BERT and T5 weights in and out of jaxformer.

Kept outside :mod:`jaxformer.model`, so the model stays free of checkpoint formats (as
torchtitan keeps its converters beside the model): this package imports the model, never
the other way round. Modules:

- :mod:`~jaxformer.hf.decoder` (GPT-2, LLaMA), :mod:`~jaxformer.hf.bert`,
  :mod:`~jaxformer.hf.t5`: each model type's config translation and name/shape map;
- :mod:`~jaxformer.hf.common`: reading config fields, and the checks every import and
  export runs both ways (a setting that cannot convert is refused, naming ``model.KEY``
  or the Hugging Face field);
- :mod:`~jaxformer.hf.model_type`: the :class:`HFModelType` record (config.json's
  ``model_type`` and the jaxformer task it becomes) and the comparison of a config with
  a checkpoint's;
- :mod:`~jaxformer.hf.mapping`: walking a map (names, shapes, scanned-layer stacking,
  dtypes, tied tensors);
- :mod:`~jaxformer.hf.checkpoint_dir`: config.json + safetensors directories, without
  torch or transformers;
- :mod:`~jaxformer.hf.registry`: the model types a directory can hold (``MODEL_TYPES``).

``torch`` and ``transformers`` are imported lazily, only by the functions that build or
read their objects, and are never a runtime dependency of training.

Example::

    from jaxformer import hf

    model = hf.import_hf(GPT2LMHeadModel.from_pretrained("gpt2"))
    hf.save_hf_dir(model, "out/")   # from_pretrained("out/") loads it
    again = hf.load_hf_dir("out/")
"""

from jaxformer.hf.bert import (
    config_from_hf_bert,
    export_hf_bert,
    hf_bert_config,
    hf_bert_config_dict,
    hf_bert_state_dict,
    import_hf_bert,
)
from jaxformer.hf.checkpoint_dir import (
    CONFIG_FILE,
    INDEX_FILE,
    MAX_SHARD_SIZE,
    WEIGHTS_FILE,
    config_from_hf_dir,
    load_hf_dir,
    read_hf_config,
    read_hf_dir,
    read_safetensors,
    save_hf_dir,
    tensor_shapes,
    weight_files,
    write_hf_dir,
)
from jaxformer.hf.decoder import (
    config_from_hf,
    export_hf,
    hf_config,
    hf_config_dict,
    hf_state_dict,
    import_hf,
    jax_state_from_hf,
    model_type_of,
    model_type_of_hf,
)
from jaxformer.hf.mapping import flatten, nest, path_name
from jaxformer.hf.model_type import HFModelType, config_differences, derived_overrides
from jaxformer.hf.registry import MODEL_TYPES, model_type_of_hf_config, model_type_of_model
from jaxformer.hf.t5 import (
    config_from_hf_t5,
    export_hf_t5,
    hf_t5_config,
    hf_t5_config_dict,
    hf_t5_state_dict,
    import_hf_t5,
    jax_state_from_hf_t5,
)

__all__ = [
    "CONFIG_FILE",
    "HFModelType",
    "INDEX_FILE",
    "MAX_SHARD_SIZE",
    "MODEL_TYPES",
    "WEIGHTS_FILE",
    "config_differences",
    "config_from_hf",
    "config_from_hf_bert",
    "config_from_hf_dir",
    "config_from_hf_t5",
    "derived_overrides",
    "export_hf",
    "export_hf_bert",
    "export_hf_t5",
    "flatten",
    "hf_bert_config",
    "hf_bert_config_dict",
    "hf_bert_state_dict",
    "hf_config",
    "hf_config_dict",
    "hf_state_dict",
    "hf_t5_config",
    "hf_t5_config_dict",
    "hf_t5_state_dict",
    "import_hf",
    "import_hf_bert",
    "import_hf_t5",
    "jax_state_from_hf",
    "jax_state_from_hf_t5",
    "load_hf_dir",
    "model_type_of",
    "model_type_of_hf",
    "model_type_of_hf_config",
    "model_type_of_model",
    "nest",
    "path_name",
    "read_hf_config",
    "read_hf_dir",
    "read_safetensors",
    "save_hf_dir",
    "tensor_shapes",
    "weight_files",
    "write_hf_dir",
]
