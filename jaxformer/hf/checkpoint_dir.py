"""Hugging Face checkpoint directories: config.json plus safetensors, without torch.

A directory holds ``config.json`` and ``model.safetensors``, or shards listed by
``model.safetensors.index.json``; both are read and written here with
``safetensors.numpy``, so :func:`load_hf_dir` and :func:`save_hf_dir` need neither
``torch`` nor ``transformers``. The model type (config translation, checks, map) comes
from :mod:`jaxformer.hf.registry` by config.json's ``model_type`` or the model's class.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxformer.hf.model_type import config_differences
from jaxformer.hf.registry import CONFIG_FILE, model_type_of_hf_config, model_type_of_model

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' save_pretrained default ("5GB")

# Float dtypes numpy (and so safetensors.numpy) cannot read: read from the raw bytes as
# ml_dtypes types, then widened to float32 like every other half-precision tensor.
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# -- reading ------------------------------------------------------------------------------


def _header(file: str) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) and the offset
    of its data: 8 bytes of little-endian length, then that much JSON."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise ValueError(f"'{file}' is not a readable safetensors file: {err}") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def read_safetensors(file: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (``safetensors.numpy``, no torch); half
    and lower precision floats (bf16, fp16, fp8) become float32, as from torch."""
    import ml_dtypes  # a jax dependency: numpy dtypes for bf16 and fp8
    from safetensors import safe_open

    header, start = _header(file)
    out: dict[str, np.ndarray] = {}
    with safe_open(file, framework="numpy") as f:
        for name, info in header.items():
            if info["dtype"] not in _RAW_DTYPES:
                out[name] = f.get_tensor(name)
    raw = {k: v for k, v in header.items() if v["dtype"] in _RAW_DTYPES}
    if raw:
        with open(file, "rb") as f:
            for name, info in raw.items():
                begin, end = info["data_offsets"]
                f.seek(start + begin)
                dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[info["dtype"]]))
                out[name] = np.frombuffer(f.read(end - begin), dtype).reshape(info["shape"])
    floats = ("f", "V")  # ml_dtypes' bf16 and fp8 are kind "V"
    return {
        k: v.astype(np.float32) if v.dtype.kind in floats and v.dtype.itemsize < 4 else v
        for k, v in out.items()
    }


def weight_files(path: str) -> dict[str, list[str]]:
    """``{file: [tensor names]}`` of a checkpoint directory: ``model.safetensors``, or the
    shards ``model.safetensors.index.json`` lists. Raises FileNotFoundError naming what is
    missing (a pytorch_model.bin alone is named too: only safetensors are read)."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return {single: list(_header(single)[0])}
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(name)
        lost = [f for f in files if not os.path.isfile(f)]
        if lost:
            raise FileNotFoundError(f"'{index}' lists shards that are missing: {lost}")
        return files
    other = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if
             os.path.isfile(os.path.join(path, n))]  # fmt: skip
    hint = (
        f" (it has {other[0]}: resave it with save_pretrained(safe_serialization=True))"
        if other
        else ""
    )
    raise FileNotFoundError(f"'{path}' has neither '{WEIGHTS_FILE}' nor '{INDEX_FILE}'{hint}")


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json of a checkpoint directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"'{path}' is not a directory (a Hugging Face checkpoint)")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"'{file}' is missing: a Hugging Face directory needs it")
    with open(file) as f:
        return json.load(f)


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``{tensor: shape}`` of a checkpoint directory, from the headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in weight_files(path).items():
        header = _header(file)[0]
        shapes.update({n: tuple(header[n]["shape"]) for n in names if n in header})
    return shapes


def read_hf_dir(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """``(config.json, {tensor: numpy array}, {tensor: file})`` of a checkpoint directory.
    A tensor the index lists and its shard lacks raises KeyError naming both."""
    hf_config = read_hf_config(path)
    state: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for file, names in weight_files(path).items():
        tensors = read_safetensors(file)
        lost = [n for n in names if n not in tensors]
        if lost:
            raise KeyError(f"'{file}' lacks {lost[:8]}, which '{INDEX_FILE}' puts there")
        state.update({n: tensors[n] for n in names})
        where.update(dict.fromkeys(names, file))
    return hf_config, state, where


def config_from_hf_dir(path: str) -> Any:
    """The full jaxformer config that reproduces a checkpoint directory's model."""
    hf_config = read_hf_config(path)
    model_type = model_type_of_hf_config(hf_config, os.path.join(path, CONFIG_FILE))
    return model_type.config_from_hf(hf_config, tensor_shapes(path))


def _naming_files(err: Exception, where: Mapping[str, str], path: str) -> Exception:
    """``err`` (from a model type's map) with the files of the tensors it names: the error
    of a directory read should say where to look."""
    message = str(err.args[0]) if err.args else str(err)
    files = sorted({f for name, f in where.items() if f"'{name}'" in message})
    if not files:
        files = sorted(set(where.values()))
        files = files if len(files) == 1 else [os.path.join(path, INDEX_FILE)]
    return type(err)(f"{message} [in {', '.join(files)}]")


def load_hf_dir(path: str, cfg: Any = None, *, model_type: str | None = None, seed: int = 0) -> Any:
    """A jaxformer model holding a local Hugging Face checkpoint directory: config.json
    and ``model.safetensors`` (or sharded with its index), read without torch or
    transformers.

    ``cfg`` (a full jaxformer config) defaults to :func:`config_from_hf_dir`; one given
    must describe the same model (layout keys like ``scan_layers``, ``dtype`` and
    ``remat`` are free, and the model runs the attention backend ``model.attention_impl``
    selects), else ValueError names the keys that differ. ``model_type`` (``gpt2``,
    ``llama``, ``bert``, ``t5``), if given, must be the directory's (config.json's
    ``model_type``). bf16/fp16 tensors are cast to the model's parameter dtype (float32
    by default).
    """
    path = os.fspath(path)
    hf_config, state, where = read_hf_dir(path)
    mt = model_type_of_hf_config(hf_config, os.path.join(path, CONFIG_FILE))
    if model_type is not None and model_type != mt.name:
        raise ValueError(
            f"'{os.path.join(path, CONFIG_FILE)}' holds a {mt.name} model (model_type), "
            f"not {model_type}"
        )
    derived = mt.config_from_hf(hf_config, {k: v.shape for k, v in state.items()})
    if cfg is None:
        cfg = derived
    else:
        wrong = config_differences(cfg, derived, mt)
        if wrong:
            detail = ", ".join(
                f"model.{k}={a!r} (config.json: {b!r})" for k, (a, b) in wrong.items()
            )
            raise ValueError(f"config does not match '{path}': {detail}")
    try:
        return mt.import_state(state, cfg, seed)
    except (KeyError, ValueError) as err:
        raise _naming_files(err, where, path) from None


# -- writing ------------------------------------------------------------------------------


def write_hf_dir(
    path: str,
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> list[str]:
    """Writes config.json and the tensors as ``model.safetensors``, or, above
    ``max_shard_size`` bytes, as ``model-0000i-of-0000n.safetensors`` shards listed by
    ``model.safetensors.index.json`` (as transformers does); returns the weight files.
    Weight files of an earlier save in ``path`` are removed first, so no stale shard or
    index shadows the new weights.

    The configuration is checked both ways before anything is written (ValueError
    otherwise): ``hf_config`` must be of a model type jaxformer reads (``model_type``), convert
    to a jaxformer config (no Hugging Face field it cannot reproduce), and that config
    must convert back (no jaxformer setting Hugging Face cannot carry). Tensor names and
    shapes are the caller's: :func:`save_hf_dir` writes the model type's map."""
    from safetensors.numpy import save_file

    model_type = model_type_of_hf_config(dict(hf_config), "hf_config")
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    model_type.config_to_hf(model_type.config_from_hf(dict(hf_config), shapes))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _remove_weights(path)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n")
    arrays = {k: _savable(v) for k, v in tensors.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in arrays.items():
        if shards[-1] and size + value.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    metadata = {"format": "pt"}  # what transformers writes and expects
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_FILE), metadata=metadata)
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(path, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in arrays.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        f.write(json.dumps(index, indent=2) + "\n")
    return names


def _savable(value: Any) -> np.ndarray:
    """A C-contiguous numpy array safetensors.numpy can write: bf16 (which it cannot) as
    float32."""
    value = np.asarray(value)
    if value.dtype.kind not in "biuf" or value.dtype.name in _RAW_DTYPES.values():
        value = value.astype(np.float32)
    return np.ascontiguousarray(value)


def _remove_weights(path: str) -> None:
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            shards = set(json.load(f).get("weight_map", {}).values())
        for shard in shards:
            if os.path.isfile(os.path.join(path, shard)):
                os.remove(os.path.join(path, shard))
        os.remove(index)
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        os.remove(os.path.join(path, WEIGHTS_FILE))


def save_hf_dir(
    model: nnx.Module,
    path: str,
    model_type: str | None = None,
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> list[str]:
    """Writes ``model`` as a Hugging Face checkpoint directory (config.json with
    ``architectures`` and ``model_type``, float32 safetensors) that
    ``transformers.AutoModel*.from_pretrained(path)`` loads; no torch or transformers is
    needed. A model the model type's config cannot carry exactly is refused (ValueError
    naming ``model.KEY``) before anything is written. ``model_type`` (``gpt2``,
    ``llama``, ``bert``, ``t5``), if given, must be the one that holds the model. Returns
    the weight files written."""
    mt = model_type_of_model(model)
    if model_type is not None and model_type != mt.name:
        raise ValueError(f"the model is a {mt.name} model, not {model_type}")
    hf_config, tensors = mt.export(model)
    hf_config = {**hf_config, "dtype": "float32"}
    return write_hf_dir(os.fspath(path), hf_config, tensors, max_shard_size=max_shard_size)


__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "MAX_SHARD_SIZE",
    "WEIGHTS_FILE",
    "config_from_hf_dir",
    "load_hf_dir",
    "read_hf_config",
    "read_hf_dir",
    "read_safetensors",
    "save_hf_dir",
    "tensor_shapes",
    "weight_files",
    "write_hf_dir",
]
