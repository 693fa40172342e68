"""The declarative weight map of a Hugging Face model type, and its walk both ways.

Each model type module (:mod:`jaxformer.hf.decoder` for GPT-2 and LLaMA,
:mod:`jaxformer.hf.bert`, :mod:`jaxformer.hf.t5`) describes its checkpoint as a list of
:class:`Weight`, one per Hugging Face tensor, naming the jaxformer parameter it holds and
the :class:`Layout` (transpose, heads split out) between the two. Map paths index
layers, ``("blocks", 3, "attn", "q", "kernel")``; the stacks a model scans are stacked
here (``stacks={"blocks": num_layers}``), so one map serves both layouts. From the map:

- :func:`params_from_hf` imports: every name the source has must have a place, every
  parameter the model has must be filled (optional heads aside), every shape must match,
  a tied tensor the source holds must equal the one it is tied to, and values are cast
  to the model's dtypes.
- :func:`build_model` makes the module from ``eval_shape`` and fills it: no random
  initialisation unless a head is left out.
- :func:`params_to_hf` exports, under every name the map gives (tied aliases included).

Conversion goes through numpy; ``torch`` is imported only by :func:`to_numpy` (when it is
given a tensor) and :func:`to_torch`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.model import ModelConfig

Path = tuple[str | int, ...]


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
    for a parameter another weight maps (a tied head): written on export; on import, a
    source that holds it must hold the same values as the weight it is tied to, since
    jaxformer keeps one copy (``tied_by`` says which setting ties them). ``head``: an
    optional head; the source has it whole or not at all, and a head it lacks keeps the
    model's seeded initialisation.
    """

    hf: str
    parts: tuple[tuple[Path, Layout], ...]
    alias: bool = False
    head: str = ""
    tied_by: str = ""

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


TIED_HEAD = "model.tie_embeddings=True (Hugging Face tie_word_embeddings)"


def lm_head(tied: bool, tied_by: str = TIED_HEAD) -> Weight:
    """``lm_head.weight`` (``nn.Linear``): the output kernel, or (tied) the embedding again."""
    if tied:
        return weight("lm_head.weight", ("embed",), alias=True, tied_by=tied_by)
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
    model_type: str,
    stacks: Mapping[str, int],
    ignored: Collection[str] = (),
) -> dict[Path, np.ndarray]:
    """``{path: numpy array}`` of the model's parameters (``expected``, from
    :func:`expected_params`) from a Hugging Face state dict and the model type's map.

    Raises KeyError for a name the map needs and the source lacks, ValueError for a name
    of the source the map has no place for (unless ``ignored``: buffers, not parameters),
    for a tied tensor whose values differ from the one it is tied to, for a parameter the
    model has and the map does not fill (heads the source lacks aside) and for a shape
    that differs. Scanned ``stacks`` are stacked; values are cast to the model's dtypes.
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
        raise KeyError(f"Hugging Face {model_type} state dict lacks {missing[:8]}")
    unused = sorted(set(state_dict) - {w.hf for w in weights} - set(ignored))
    if unused:
        raise ValueError(f"Hugging Face weights jaxformer has no place for: {unused[:8]}")
    flat: dict[Path, np.ndarray] = {}
    source: dict[Path, str] = {}
    for w in used:
        parts = _converted(w, to_numpy(state_dict[w.hf]), expected, stacks)
        flat.update(parts)
        source.update(dict.fromkeys(parts, w.hf))
    _check_tied(state_dict, weights, flat, source, model_type)
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


def _check_tied(
    state_dict: Mapping[str, Any],
    weights: Sequence[Weight],
    flat: Mapping[Path, np.ndarray],
    source: Mapping[Path, str],
    model_type: str,
) -> None:
    """Raises if a tied tensor the source holds differs from the one it is tied to: the
    model keeps one copy, so importing would drop the other's values without a word
    (an untied BERT MLM decoder, a GPT-2 ``lm_head`` of an untied checkpoint ...)."""
    for w in weights:
        if not w.alias or w.hf not in state_dict:
            continue
        for path, value in w.to_jax(to_numpy(state_dict[w.hf])).items():
            primary = flat.get(path)
            if primary is None:  # tied to a head the source lacks
                continue
            same = primary.shape == value.shape and np.array_equal(primary, value)
            if not same:
                raise ValueError(
                    f"Hugging Face {model_type} tensor '{w.hf}' differs from '{source[path]}', "
                    f"which jaxformer ties it to ({w.tied_by or 'one parameter'}): the "
                    "checkpoint is untied, which this model cannot hold"
                )


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


__all__ = [
    "SAME",
    "TIED_HEAD",
    "TRANSPOSED",
    "Layout",
    "Path",
    "Weight",
    "attention",
    "build_model",
    "dense",
    "expected_params",
    "flatten",
    "kernel",
    "lm_head",
    "loaded",
    "nest",
    "norm",
    "packed",
    "params_from_hf",
    "params_to_hf",
    "path_name",
    "reshaped",
    "stack_layers",
    "to_numpy",
    "to_torch",
    "unstack_layers",
    "weight",
]
