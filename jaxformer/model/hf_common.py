"""What the Hugging Face converters share: config fields, the weight map and its walk.

Each family module (:mod:`~jaxformer.model.hf` for GPT-2 and LLaMA,
:mod:`~jaxformer.model.hf_bert`, :mod:`~jaxformer.model.hf_t5`) holds only its config
translation and a declarative map: a list of :class:`Weight`, one per Hugging Face tensor,
naming the jaxformer parameter it holds and the :class:`Layout` (transpose, heads split
out) between the two. Map paths index layers, ``("blocks", 3, "attn", "q", "kernel")``;
the stacks a model scans are stacked here (``stacks={"blocks": num_layers}``), so one
map serves both layouts. From the map:

- :func:`params_from_hf` imports: every name the source has must have a place, every
  parameter the model has must be filled (optional heads aside), every shape must match,
  and values are cast to the model's dtypes.
- :func:`build_model` makes the module from ``eval_shape`` and fills it: no random
  initialisation unless a head is left out.
- :func:`params_to_hf` exports, under every name the map gives (tied aliases included).

Conversion goes through numpy; ``torch`` is imported only by :func:`to_numpy` (when it is
given a tensor) and :func:`to_torch`.

Checkpoint directories (``config.json`` plus ``model.safetensors``, or shards listed by
``model.safetensors.index.json``) are read and written here with ``safetensors.numpy``, so
:func:`load_hf_dir` and :func:`save_hf_dir` need neither ``torch`` nor ``transformers``:
each family module contributes a :class:`Family` (its config translation and its map).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.model.decoder import ModelConfig

Path = tuple[str | int, ...]


# -- configs ------------------------------------------------------------------------------


def get(hf_config: Any, name: str, default: Any = None) -> Any:
    """Reads a field from a transformers config object or a config.json dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def need(hf_config: Any, name: str) -> Any:
    """A field the conversion cannot guess."""
    value = get(hf_config, name)
    if value is None:
        raise ValueError(f"Hugging Face config has no '{name}'")
    return value


def model_config(cfg: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a full config, or its model section."""
    if isinstance(cfg, ModelConfig):
        return cfg
    return ModelConfig.from_config(cfg.get("model", cfg))


def check_equivalent(m: ModelConfig, want: Mapping[str, Any], family: str) -> None:
    """Raises unless ``m`` has every value of ``want``: what a Hugging Face ``family``
    model can hold. A key ``m`` lacks counts as its value in ``want``."""
    wrong = {k: getattr(m, k, v) for k, v in want.items() if getattr(m, k, v) != v}
    if wrong:
        needed = {k: want[k] for k in wrong}
        raise ValueError(
            f"a jaxformer model with {wrong} has no Hugging Face {family} equivalent; "
            f"{family} needs {needed}"
        )


def check_same_model(
    have: ModelConfig,
    want: ModelConfig,
    keys: Sequence[str],
    what: str,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raises if ``have`` computes something else than ``want``: eps, RoPE base and the
    like are not in the weights, so shapes alone cannot tell. ``keys`` are the config
    keys that matter; one a config lacks reads as its value in ``defaults``."""
    defaults = defaults or {}
    pairs = {
        k: (getattr(have, k, defaults.get(k)), getattr(want, k, defaults.get(k))) for k in keys
    }
    wrong = {k: (a, b) for k, (a, b) in pairs.items() if a != b}
    if wrong:
        detail = ", ".join(f"model.{k}={a!r} ({what}: {b!r})" for k, (a, b) in wrong.items())
        raise ValueError(f"config does not match the {what}: {detail}")


def read_source(
    source: Any, cfg: Any, config_from_hf: Callable[[Any], Any], caller: str
) -> tuple[ModelConfig, Mapping[str, Any], Any]:
    """``(model config, state dict, Hugging Face config or None)`` of an import's source:
    a transformers model, or a state dict (then ``cfg`` is required). ``cfg`` defaults
    to ``config_from_hf(source.config)``."""
    hf_cfg = getattr(source, "config", None)
    if cfg is None:
        if hf_cfg is None:
            raise ValueError(f"{caller} needs cfg when given a bare state dict")
        cfg = config_from_hf(hf_cfg)
    state_dict = source.state_dict() if hasattr(source, "state_dict") else source
    return model_config(cfg), state_dict, hf_cfg


def with_prefix(state_dict: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """The names of a headless model (GPT2Model, BertModel ...) under its LM's prefix."""
    if any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {prefix + k: v for k, v in state_dict.items()}


def config_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """Keyword arguments for a transformers config class."""
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


# -- the weight map -----------------------------------------------------------------------


class Layout(NamedTuple):
    """How a Hugging Face tensor becomes a jaxformer array (``to_jax``) and back."""

    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda x: x, lambda x: x)
TRANSPOSED = Layout(np.transpose, np.transpose)  # nn.Linear [out, in] <-> Dense [in, out]


def kernel(in_shape: Sequence[int], out_shape: Sequence[int], *, transposed: bool = True) -> Layout:
    """A 2-D weight (``nn.Linear``: ``[out, in]``, transposed; GPT-2's ``Conv1D``:
    ``[in, out]``) <-> a Dense kernel ``[*in_shape, *out_shape]``, heads split out."""
    fan_in = math.prod(in_shape)

    def to_jax(w: np.ndarray) -> np.ndarray:
        return (w.T if transposed else w).reshape(*in_shape, *out_shape)

    def to_hf(k: np.ndarray) -> np.ndarray:
        k = k.reshape(fan_in, -1)
        return k.T if transposed else k

    return Layout(to_jax, to_hf)


def reshaped(*shape: int) -> Layout:
    """A flat tensor <-> ``shape`` (the bias of q, k or v: ``[H * Dh]`` <-> ``[H, Dh]``)."""
    return Layout(lambda b: b.reshape(shape), lambda b: b.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Weight:
    """One Hugging Face tensor ``hf`` and the jaxformer parameter(s) it holds.

    ``parts`` is ``((path, layout),)``, or several parts for a tensor that packs them
    (GPT-2's ``c_attn``: q, k, v concatenated on the last axis). ``alias``: a second name
    for a parameter another weight maps (a tied head): not read on import, written on
    export. ``head``: an optional head; the source has it whole or not at all, and a
    head it lacks keeps the model's seeded initialisation.
    """

    hf: str
    parts: tuple[tuple[Path, Layout], ...]
    alias: bool = False
    head: str = ""

    def to_jax(self, value: np.ndarray) -> dict[Path, np.ndarray]:
        pieces = np.split(value, len(self.parts), axis=-1) if len(self.parts) > 1 else [value]
        return {p: layout.to_jax(x) for (p, layout), x in zip(self.parts, pieces, strict=True)}

    def to_hf(self, params: Mapping[Path, np.ndarray]) -> np.ndarray:
        pieces = [layout.to_hf(params[path]) for path, layout in self.parts]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)


def weight(hf: str, path: Path, layout: Layout = SAME, **kwargs: Any) -> Weight:
    """A tensor holding one parameter."""
    return Weight(hf, ((path, layout),), **kwargs)


def dense(
    hf: str, path: Path, kernel_layout: Layout, bias_layout: Layout | None, **kwargs: Any
) -> list[Weight]:
    """A linear module: ``{hf}.weight`` -> ``path/kernel``, ``{hf}.bias`` -> ``path/bias``
    (no bias when ``bias_layout`` is None)."""
    out = [weight(f"{hf}.weight", (*path, "kernel"), kernel_layout, **kwargs)]
    if bias_layout is not None:
        out.append(weight(f"{hf}.bias", (*path, "bias"), bias_layout, **kwargs))
    return out


def packed(
    hf: str, paths: Sequence[Path], kernel_layout: Layout, bias_layout: Layout
) -> list[Weight]:
    """A linear module whose output axis packs several (GPT-2's ``c_attn``: q, k, v),
    each part converted with the layouts given."""
    return [
        Weight(f"{hf}.weight", tuple(((*path, "kernel"), kernel_layout) for path in paths)),
        Weight(f"{hf}.bias", tuple(((*path, "bias"), bias_layout) for path in paths)),
    ]


def lm_head(tied: bool) -> Weight:
    """``lm_head.weight`` (``nn.Linear``): the output kernel, or (tied) the embedding again."""
    if tied:
        return weight("lm_head.weight", ("embed",), alias=True)
    return weight("lm_head.weight", ("lm_head", "kernel"), TRANSPOSED)


def norm(hf: str, path: Path, *, bias: bool, **kwargs: Any) -> list[Weight]:
    """A LayerNorm/RMSNorm: ``{hf}.weight`` -> ``path/scale`` (and ``.bias``)."""
    out = [weight(f"{hf}.weight", (*path, "scale"), **kwargs)]
    if bias:
        out.append(weight(f"{hf}.bias", (*path, "bias"), **kwargs))
    return out


def attention(modules: Sequence[str], path: Path, m: ModelConfig, *, bias: bool) -> list[Weight]:
    """Attention of four ``nn.Linear`` modules (``modules``: q, k, v, o) <-> jaxformer's
    ``path/{q,k,v,o}``: q ``[D, H, Dh]``, k and v ``[D, K, Dh]``, o ``[H, Dh, D]``."""
    d, dh = m.d_model, m.head_dim
    heads = {"q": m.num_heads, "k": m.num_kv_heads, "v": m.num_kv_heads}
    out: list[Weight] = []
    for name, module in zip("qkvo", modules, strict=True):
        if name == "o":
            layouts = kernel((m.num_heads, dh), (d,)), SAME
        else:
            layouts = kernel((d,), (heads[name], dh)), reshaped(heads[name], dh)
        out += dense(module, (*path, name), layouts[0], layouts[1] if bias else None)
    return out


# -- scanned (stacked) layers -------------------------------------------------------------


def stack_layers(flat: Mapping[Path, np.ndarray], stacks: Mapping[str, int]) -> dict[Path, Any]:
    """``(stack, i, *rest)`` -> ``(stack, *rest)`` stacked over i, for each scanned
    ``stack`` (with its number of layers); other paths as they are."""
    out = {k: v for k, v in flat.items() if k[0] not in stacks}
    for stack, layers in stacks.items():
        for rest in {k[2:] for k in flat if k[0] == stack}:
            out[(stack, *rest)] = np.stack([flat[(stack, i, *rest)] for i in range(layers)])
    return out


def unstack_layers(flat: Mapping[Path, np.ndarray], stacks: Mapping[str, int]) -> dict[Path, Any]:
    """The inverse of :func:`stack_layers`."""
    out = {k: v for k, v in flat.items() if k[0] not in stacks}
    for key, value in flat.items():
        if key[0] in stacks:
            out.update({(key[0], i, *key[1:]): value[i] for i in range(stacks[key[0]])})
    return out


# -- trees and arrays ---------------------------------------------------------------------


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    """A nested dict as ``{path: leaf}``."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def nest(flat: Mapping[Path, Any]) -> dict:
    """The inverse of :func:`flatten`."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def path_name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array-like as a numpy array; bf16/fp16
    tensors become float32, since numpy has no bf16 and the target dtype is applied later."""
    if hasattr(value, "detach"):  # a torch tensor; torch is imported only if one is given
        import torch

        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.to(torch.float32)
        return value.numpy()
    return np.asarray(value)


def to_torch(arrays: Mapping[str, np.ndarray], dtype: Any = None) -> dict[str, Any]:
    """numpy arrays as float32 torch tensors, then cast to ``dtype`` (a torch dtype)."""
    import torch

    # Writable float32 copies only where needed: jax hands out read-only buffers.
    tensors = {
        k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in arrays.items()
    }
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return tensors


def loaded(hf_model: Any, tensors: Mapping[str, Any]) -> Any:
    """``hf_model`` (a transformers model) holding ``tensors`` (``strict``: every name),
    in eval mode."""
    hf_model.load_state_dict(tensors, strict=True)
    return hf_model.eval()


# -- import and export --------------------------------------------------------------------


def expected_params(make: Callable[[nnx.Rngs], nnx.Module]) -> dict[Path, Any]:
    """``{path: ShapeDtypeStruct}`` of the parameters of ``make(rngs)``, none computed."""
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    return flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def params_from_hf(
    state_dict: Mapping[str, Any],
    weights: Sequence[Weight],
    expected: Mapping[Path, Any],
    *,
    family: str,
    stacks: Mapping[str, int],
    ignored: Collection[str] = (),
) -> dict[Path, np.ndarray]:
    """``{path: numpy array}`` of the model's parameters (``expected``, from
    :func:`expected_params`) from a Hugging Face state dict and the family's map.

    Raises KeyError for a name the map needs and the source lacks, ValueError for a name
    of the source the map has no place for (unless ``ignored``: buffers, not parameters),
    for a parameter the model has and the map does not fill (heads the source lacks
    aside) and for a shape that differs. Scanned ``stacks`` are stacked; values are cast
    to the model's dtypes.
    """
    present = {w.head for w in weights if w.head and w.hf in state_dict}
    used = [w for w in weights if not w.alias and (not w.head or w.head in present)]
    skipped = {
        (p[0], *p[2:]) if p[0] in stacks else p
        for w in weights
        if w.head and w.head not in present
        for p, _ in w.parts
    }
    missing = [w.hf for w in used if w.hf not in state_dict]
    if missing:
        raise KeyError(f"Hugging Face {family} state dict lacks {missing[:8]}")
    unused = sorted(set(state_dict) - {w.hf for w in weights} - set(ignored))
    if unused:
        raise ValueError(f"Hugging Face weights jaxformer has no place for: {unused[:8]}")
    flat: dict[Path, np.ndarray] = {}
    for w in used:
        flat.update(_converted(w, to_numpy(state_dict[w.hf]), expected, stacks))
    flat = stack_layers(flat, stacks)
    extra = sorted(map(path_name, set(flat) - set(expected)))
    lack = sorted(map(path_name, set(expected) - set(flat) - skipped))
    if extra or lack:
        raise ValueError(f"parameter names differ: model lacks {extra}, mapping lacks {lack}")
    for path, value in flat.items():
        spec = expected[path]
        if value.shape != spec.shape:
            raise ValueError(
                f"'{path_name(path)}' has shape {value.shape} in the Hugging Face weights but "
                f"{spec.shape} in the jaxformer config (check vocab_size, max_len, heads)"
            )
        flat[path] = value.astype(spec.dtype, copy=False)
    return flat


def _converted(
    w: Weight, value: np.ndarray, expected: Mapping[Path, Any], stacks: Mapping[str, int]
) -> dict[Path, np.ndarray]:
    """``w.to_jax(value)``, each part's shape checked against the model's, so an error
    names the Hugging Face tensor (and its shape) as well as the jaxformer parameter."""
    try:
        parts = w.to_jax(value)
    except ValueError as err:  # a reshape or split the tensor's size does not allow
        raise ValueError(
            f"Hugging Face tensor '{w.hf}' has shape {value.shape}, which does not fit the "
            f"jaxformer config ({err}; check d_model, heads, head_dim, d_ff)"
        ) from None
    for path, part in parts.items():
        stacked = path[0] in stacks
        spec = expected.get((path[0], *path[2:]) if stacked else path)
        want = None if spec is None else tuple(spec.shape[1:] if stacked else spec.shape)
        if want is not None and part.shape != want:
            raise ValueError(
                f"'{path_name(path)}' has shape {part.shape} from Hugging Face tensor "
                f"'{w.hf}' {value.shape} but {want} in the jaxformer config (check "
                "vocab_size, max_len, d_model, heads, d_ff)"
            )
    return parts


def build_model(
    make: Callable[[nnx.Rngs], nnx.Module], params: Mapping[Path, np.ndarray], seed: int
) -> Any:
    """``make(nnx.Rngs(seed))`` holding ``params``. Built from ``eval_shape`` with no
    random initialisation, unless ``params`` leave some parameter out (a head the source
    lacks): then it is initialised, and keeps that seeded value."""
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(seed)))
    names = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    model = make(nnx.Rngs(seed)) if set(names) - set(params) else abstract
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, nest(params)))
    return nnx.merge(graphdef, state)


def params_to_hf(
    model: nnx.Module,
    weights: Sequence[Weight],
    stacks: Mapping[str, int],
    *,
    aliases: bool = True,
) -> dict[str, np.ndarray]:
    """The model's weights under the map's Hugging Face names, as contiguous numpy arrays;
    ``stacks`` are the model's scanned stacks. ``aliases=False`` leaves out the second
    names of tied parameters, as ``save_pretrained`` does (transformers re-ties them)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(pure).items()}
    flat = unstack_layers(flat, stacks)
    return {w.hf: np.ascontiguousarray(w.to_hf(flat)) for w in weights if aliases or not w.alias}


# -- checkpoint directories ---------------------------------------------------------------

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' save_pretrained default ("5GB")

# Float dtypes numpy (and so safetensors.numpy) cannot read: read from the raw bytes as
# ml_dtypes types, then widened to float32 like every other half-precision tensor.
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face model family as a checkpoint directory needs it.

    ``name`` is config.json's ``model_type``; ``model_family`` the jaxformer
    ``model.family`` it becomes. ``config_from_hf(hf_config, shapes)`` gives a full
    jaxformer config from config.json (``shapes``: ``{tensor: shape}`` of the files, for
    what config.json does not say, such as a classifier's labels). ``arch_keys`` are the
    model keys that change what the weights compute (a config lacking one reads it from
    ``defaults``). ``import_state(state_dict, cfg, seed)`` runs the family's map;
    ``export(model)`` gives config.json's fields and the tensors to write (no aliases).
    """

    name: str
    model_family: str
    config_from_hf: Callable[[Mapping[str, Any], Mapping[str, tuple[int, ...]]], Any]
    arch_keys: tuple[str, ...]
    import_state: Callable[[Mapping[str, Any], Any, int], nnx.Module]
    export: Callable[[nnx.Module], tuple[dict[str, Any], dict[str, np.ndarray]]]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def families() -> dict[str, Family]:
    """Every family a checkpoint directory can hold, by ``model_type``. The family
    modules import this one, so they are imported here, when first needed."""
    out: dict[str, Family] = {}
    for module in ("hf", "hf_bert", "hf_t5"):
        for family in importlib.import_module(f"jaxformer.model.{module}").DIR_FAMILIES:
            out[family.name] = family
    return out


def family_of_hf_config(hf_config: Mapping[str, Any], where: str = CONFIG_FILE) -> Family:
    """The :class:`Family` of a config.json dict (by ``model_type``)."""
    known = families()
    model_type = hf_config.get("model_type")
    if model_type not in known:
        raise ValueError(
            f"'{where}' has model_type {model_type!r}; jaxformer reads {sorted(known)}"
        )
    return known[model_type]


def family_of_model(model: nnx.Module) -> Family:
    """The :class:`Family` that holds a jaxformer model exactly (raises if none does)."""
    m: ModelConfig = model.cfg
    known = families()
    if m.family == "decoder":
        from jaxformer.model import hf

        return known[hf.family_of(m)]
    for family in known.values():
        if family.model_family == m.family:
            return family
    raise ValueError(f"model.family {m.family!r} has no Hugging Face mapping")


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
    family = family_of_hf_config(hf_config, os.path.join(path, CONFIG_FILE))
    return family.config_from_hf(hf_config, tensor_shapes(path))


def _model_values(cfg: Any, keys: Sequence[str], defaults: Mapping[str, Any]) -> dict:
    """The model section's ``keys``, defaults resolved as the model resolves them
    (``head_dim`` 0 is ``d_model / num_heads`` ...)."""
    section = cfg.get("model", cfg)
    resolved = dataclasses.asdict(ModelConfig.from_config(section))
    return {k: resolved[k] if k in resolved else section.get(k, defaults.get(k)) for k in keys}


def config_differences(cfg: Any, derived: Any, family: Family) -> dict[str, tuple[Any, Any]]:
    """``{key: (cfg's value, derived value)}`` of the model keys that change what the
    weights compute and differ between a jaxformer config and one derived from a
    checkpoint (``model.family`` first: another family differs in everything)."""
    ours = cfg.get("model", cfg).get("family", "decoder")
    if ours != family.model_family:
        return {"family": (ours, family.model_family)}
    keys = family.arch_keys
    have = _model_values(cfg, keys, family.defaults)
    want = _model_values(derived, keys, family.defaults)
    return {k: (have[k], want[k]) for k in keys if have[k] != want[k]}


def derived_overrides(cfg: Any, derived: Any, family: Family) -> list[str]:
    """``--config.model.KEY=VALUE`` arguments that make ``cfg``'s model the checkpoint's
    (the derived config's own values, unresolved, so they read as a user would write)."""
    section = derived.model
    out = []
    for key in config_differences(cfg, derived, family):
        value = section[key] if key in section else family.defaults.get(key)
        out.append(f"--config.model.{key}={value}")
    return out


def _naming_files(err: Exception, where: Mapping[str, str], path: str) -> Exception:
    """``err`` (from a family's map) with the files of the tensors it names: the error
    of a directory read should say where to look."""
    message = str(err.args[0]) if err.args else str(err)
    files = sorted({f for name, f in where.items() if f"'{name}'" in message})
    if not files:
        files = sorted(set(where.values()))
        files = files if len(files) == 1 else [os.path.join(path, INDEX_FILE)]
    return type(err)(f"{message} [in {', '.join(files)}]")


def load_hf_dir(path: str, cfg: Any = None, *, family: str | None = None, seed: int = 0) -> Any:
    """A jaxformer model holding a local Hugging Face checkpoint directory: config.json
    and ``model.safetensors`` (or sharded with its index), read without torch or
    transformers.

    ``cfg`` (a full jaxformer config) defaults to :func:`config_from_hf_dir`; one given
    must describe the same model (layout keys like ``scan_layers``, ``dtype`` and
    ``remat`` are free), else ValueError names the keys that differ. ``family``
    (``gpt2``, ``llama``, ``bert``, ``t5``), if given, must be the directory's.
    bf16/fp16 tensors are cast to the model's parameter dtype (float32 by default).
    """
    path = os.fspath(path)
    hf_config, state, where = read_hf_dir(path)
    fam = family_of_hf_config(hf_config, os.path.join(path, CONFIG_FILE))
    if family is not None and family != fam.name:
        raise ValueError(
            f"'{os.path.join(path, CONFIG_FILE)}' holds a {fam.name} model (model_type), "
            f"not {family}"
        )
    derived = fam.config_from_hf(hf_config, {k: v.shape for k, v in state.items()})
    if cfg is None:
        cfg = derived
    else:
        wrong = config_differences(cfg, derived, fam)
        if wrong:
            detail = ", ".join(
                f"model.{k}={a!r} (config.json: {b!r})" for k, (a, b) in wrong.items()
            )
            raise ValueError(f"config does not match '{path}': {detail}")
    try:
        return fam.import_state(state, cfg, seed)
    except (KeyError, ValueError) as err:
        raise _naming_files(err, where, path) from None


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
    index shadows the new weights."""
    from safetensors.numpy import save_file

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
    family: str | None = None,
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> list[str]:
    """Writes ``model`` as a Hugging Face checkpoint directory (config.json with
    ``architectures`` and ``model_type``, float32 safetensors) that
    ``transformers.AutoModel*.from_pretrained(path)`` loads; no torch or transformers is
    needed. ``family`` (``gpt2``, ``llama``, ``bert``, ``t5``), if given, must be the one
    that holds the model. Returns the weight files written."""
    fam = family_of_model(model)
    if family is not None and family != fam.name:
        raise ValueError(f"the model is a {fam.name} model, not {family}")
    hf_config, tensors = fam.export(model)
    hf_config = {**hf_config, "dtype": "float32"}
    return write_hf_dir(os.fspath(path), hf_config, tensors, max_shard_size=max_shard_size)


__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "MAX_SHARD_SIZE",
    "SAME",
    "TRANSPOSED",
    "WEIGHTS_FILE",
    "Family",
    "Layout",
    "Path",
    "Weight",
    "attention",
    "build_model",
    "check_equivalent",
    "check_same_model",
    "config_differences",
    "config_from_hf_dir",
    "config_kwargs",
    "dense",
    "derived_overrides",
    "expected_params",
    "families",
    "family_of_hf_config",
    "family_of_model",
    "flatten",
    "get",
    "kernel",
    "lm_head",
    "load_hf_dir",
    "loaded",
    "model_config",
    "need",
    "nest",
    "norm",
    "packed",
    "params_from_hf",
    "params_to_hf",
    "path_name",
    "read_hf_config",
    "read_hf_dir",
    "read_safetensors",
    "read_source",
    "reshaped",
    "save_hf_dir",
    "stack_layers",
    "tensor_shapes",
    "to_numpy",
    "to_torch",
    "unstack_layers",
    "weight",
    "weight_files",
    "with_prefix",
    "write_hf_dir",
]
