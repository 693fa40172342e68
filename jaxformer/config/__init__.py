"""Experiment configs: the schema (``schema.py``) and loading with overrides (``loading.py``).

Validation against the devices and between features lives with each feature and runs
through :func:`jaxformer.validation.validate`.
"""

from jaxformer.config.loading import apply_overrides, load_config, run_get_config, sibling_config
from jaxformer.config.schema import CHOICES, MESH_AXES, base_config, check_schema
from jaxformer.errors import ConfigError

__all__ = [
    "CHOICES",
    "ConfigError",
    "MESH_AXES",
    "apply_overrides",
    "base_config",
    "check_schema",
    "load_config",
    "run_get_config",
    "sibling_config",
]
