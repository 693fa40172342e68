"""The attention backends by name (``model.attention_impl``), and the one place that
picks one for a model.

Every backend is an object with one signature, ``backend(q, k, v, mask, bias, *, scale,
return_probs)``, and a ``self_mask`` that builds the mask a stack's layers share in the
form it wants. The model calls whatever its ``ModelConfig.attention`` holds and never
compares a name; :func:`select` resolves ``auto`` for the platform and, on a mesh that
splits sequences, puts ring attention (``jaxformer/parallel/ring_attention.py``) in front.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from jaxformer.attention import splash
from jaxformer.attention.dot_product import DotProduct, FusedCausal, sdpa_backend
from jaxformer.attention.masks import SegmentMask, attention_mask
from jaxformer.attention.reference import EINSUM, Einsum
from jaxformer.errors import ConfigError
from jaxformer.parallel.ring_attention import ring_attention, sequence_sharded

Backend = Einsum  # every backend subclasses the reference, whose __call__ is the signature

# model.attention_impl -> the backend; "auto" is resolved per platform by `local_backend`.
BACKENDS: dict[str, Backend] = {
    "einsum": EINSUM,
    "dot_product": DotProduct(),
    "splash": splash.Splash(),
}


@dataclasses.dataclass(frozen=True)
class SequenceParallel(Einsum):
    """Ring attention for self-attention over a :class:`SegmentMask` whose length the
    active mesh splits (``mesh.sequence > 1``); ``local`` for everything else (decoding,
    cross-attention, introspection, and meshes that leave the length whole)."""

    local: Backend = EINSUM
    name: str = "ring"

    def __call__(
        self,
        q_BxLxHxDh: jax.Array,
        k_BxSxKxDh: jax.Array,
        v_BxSxKxDh: jax.Array,
        mask_BxLxS: jax.Array | SegmentMask,
        bias_BxHxLxS: jax.Array | None,
        *,
        scale: float,
        return_probs: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        ring = isinstance(mask_BxLxS, SegmentMask) and not return_probs
        if ring and sequence_sharded(q_BxLxHxDh.shape[1]):
            return ring_attention(
                q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS.segment_ids_BxL,
                mask_BxLxS.positions_BxL, bias_BxHxLxS, causal=mask_BxLxS.causal,
                window=mask_BxLxS.window, scale=scale, block_mask=attention_mask,
            )  # fmt: skip
        return self.local(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
            scale=scale, return_probs=return_probs,
        )  # fmt: skip

    def self_mask(
        self, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, causal: bool, window: int = 0
    ) -> SegmentMask:
        """Unbuilt where the ring builds each block's mask itself."""
        if sequence_sharded(segment_ids_BxL.shape[1]):
            return SegmentMask(segment_ids_BxL, positions_BxL, causal=causal, window=window)
        return self.local.self_mask(segment_ids_BxL, positions_BxL, causal, window)


def local_backend(name: str, dtype: Any, head_dim: int, platform: str | None = None) -> Backend:
    """The one-device backend ``name`` names; ``auto`` is cuDNN's fused kernel for causal
    self-attention where it runs (:func:`sdpa_backend`: GPUs, bf16/fp16, head dims it
    takes) and the einsum reference elsewhere (CPUs, float32, TPUs)."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return FusedCausal() if sdpa_backend(platform, dtype, head_dim) == "cudnn" else EINSUM
    if name not in BACKENDS:
        raise ConfigError(
            f"config key 'model.attention_impl' is {name!r}; choose one of {['auto', *BACKENDS]}"
        )
    return BACKENDS[name]


def attention_implementation(
    name: str, dtype: Any, head_dim: int, *, causal_self: bool, platform: str | None = None
) -> str:
    """Which implementation a call of the backend ``name`` selects runs: ``dot_product``
    or ``einsum`` for ``auto``'s two cases (causal self-attention without a bias or not),
    the name itself otherwise. Describes the backends; nothing dispatches on it."""
    backend = local_backend(name, dtype, head_dim, platform)
    if isinstance(backend, FusedCausal):
        return "dot_product" if causal_self else "einsum"
    return "einsum" if name == "auto" else backend.name


def select(
    model_cfg: ml_collections.ConfigDict,
    *,
    sequence_parallel: bool = True,
    platform: str | None = None,
) -> Backend:
    """The backend a model built from ``model_cfg`` calls, chosen once before it is built.

    ``sequence_parallel`` (whether the mesh may split sequences: ``mesh.sequence > 1``)
    puts ring attention in front; left True when the mesh is not known yet, it costs a
    check of the active mesh at trace time.
    """
    heads = model_cfg.num_heads
    head_dim = model_cfg.head_dim or model_cfg.d_model // heads
    local = local_backend(model_cfg.attention_impl, model_cfg.dtype, head_dim, platform)
    return SequenceParallel(local=local) if sequence_parallel else local


def dot_product_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask_BxLxS: jax.Array | SegmentMask,
    bias_BxHxLxS: jax.Array | None,
    *,
    implementation: str,
    scale: float,
    return_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One attention call through the backend ``implementation`` names, with ring
    attention where the active mesh splits the length: for tests and tools that call
    attention without a model."""
    local = local_backend(implementation, q_BxLxHxDh.dtype, q_BxLxHxDh.shape[-1])
    return SequenceParallel(local=local)(
        q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
        scale=scale, return_probs=return_probs,
    )  # fmt: skip


def validate(cfg: ml_collections.ConfigDict, mesh: dict[str, int], *, causal_lm: bool) -> None:
    """The chosen backend's own checks (only splash has any): what it cannot run is
    refused before anything is compiled. ``causal_lm``: the family is a decoder LM."""
    if cfg.model.attention_impl == "splash":
        splash.validate(cfg, mesh, causal_lm=causal_lm)
