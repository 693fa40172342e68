"""Loading a config: run a configs/NAME.py file, apply --config.KEY=VALUE overrides."""

from __future__ import annotations

import ast
import importlib.util
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxformer.config.schema import _check_type, _flatten, _unknown_key_error, check_schema
from jaxformer.errors import ConfigError


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --config.model.norm=layernorm


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``--config.a.b=value`` (or ``a.b=value``) overrides in place."""
    known = list(_flatten(cfg))
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --config.KEY=VALUE")
        key, raw = text.split("=", 1)
        if key not in known:
            raise _unknown_key_error(key, known)
        section, _, leaf = key.rpartition(".")
        target = cfg[section] if section else cfg
        value = _parse_value(raw)
        if isinstance(target[leaf], str) and not isinstance(value, str):
            value = raw  # a string field keeps its text: --config.train.run_dir=2024
        target[leaf] = _check_type(key, value, target[leaf])


def run_get_config(path: str, what: str = "config file") -> ml_collections.ConfigDict:
    """Runs ``get_config([arg])`` of the file ``path[:arg]``, unchecked; errors name the
    file as ``what`` (experiment configs, sweep specs)."""
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise ConfigError(f"{what} '{file}' does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxformer_config_{Path(file).stem}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any error in the user's file is theirs to fix
        raise ConfigError(f"{what} '{file}' does not load: {_located(err, file)}") from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{what} '{file}' defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise  # already names its file (a sibling_config inside get_config)
    except Exception as err:  # noqa: BLE001 - ml_collections' type checks, the file's own
        raise ConfigError(f"{what} '{file}': get_config() raised {_located(err, file)}") from err


def _located(err: BaseException, file: str) -> str:
    """``Type: message`` of ``err`` with the line of ``file`` it came from (a syntax
    error's own line; else the innermost frame in that file), for a message without a
    traceback (JAXFORMER_TRACEBACK=1 prints the traceback too)."""
    line = err.lineno if isinstance(err, SyntaxError) else None
    target = Path(file).resolve()
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        if Path(frame.f_code.co_filename).resolve() == target:
            line = lineno
    message = err.msg if isinstance(err, SyntaxError) else str(err)
    at = f" at line {line}" if line else ""
    return f"{type(err).__name__}{at}: {message}"


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """For a config file that names a preset defined in another file of its folder:
    ``sibling_config(__file__, "gpt2.py:124m")``."""
    return run_get_config(str(Path(config_file).with_name(name)))


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from ``path[:arg]``, applies overrides and checks types."""
    cfg = run_get_config(path)
    cfg = check_schema(cfg)
    cfg.unlock()
    apply_overrides(cfg, overrides)
    return check_schema(cfg)
