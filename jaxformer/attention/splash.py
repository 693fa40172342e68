"""Self-attention through jax's Pallas splash attention kernel (TPU).

Splash attention is a flash-style kernel: it never materialises the ``[B, H, L, S]``
scores, and it skips the blocks that its static mask (causal, sliding window) rules out
entirely, so a causal layer does about half the work of the dense one and a sliding
window O(L * window). Packed documents are separated by segment ids inside the kernel.

The kernel runs on one device, on one example: this wrapper vmaps it over the batch and,
under an active mesh (``jaxformer.parallel.activate``), runs it in a ``shard_map`` over
the mesh axes that split the batch and the heads (``jaxformer/parallel/splash_sharding.py``),
so it composes with data, FSDP and tensor parallelism. Sequence parallelism is ring
attention's job (it never reaches here).

Tested on CPU in Pallas interpret mode (``interpret=True``) against the einsum reference;
see docs/splash_attention.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam
from jax.sharding import Mesh

from jaxformer.attention.masks import SegmentMask
from jaxformer.attention.reference import Einsum, einsum_attention
from jaxformer.errors import ConfigError
from jaxformer.parallel.sharding import Rules
from jaxformer.parallel.splash_sharding import shard_splash

# The kernel's tiles are multiples of the TPU's 128 lanes; larger blocks amortise the
# per-block overhead, 512 is what MaxText defaults to.
MIN_BLOCK = 128
MAX_BLOCK = 512

_ALTERNATIVE = "use model.attention_impl=dot_product or einsum instead"


def block_size(length: int) -> int:
    """The kernel's block size for a sequence of ``length``: the largest of 512, 256, 128
    that divides it (the kernel pads nothing, so one must)."""
    for block in (MAX_BLOCK, MAX_BLOCK // 2, MIN_BLOCK):
        if length % block == 0:
            return block
    raise ValueError(
        f"splash attention needs the sequence length to be a multiple of {MIN_BLOCK}, "
        f"got {length}: set data.seq_len to a multiple of {MIN_BLOCK}, or {_ALTERNATIVE}"
    )


def _backend() -> str:
    """The platform the kernel would compile for (a seam for the TPU-lowering test)."""
    return jax.default_backend()


def _static_mask(length: int, causal: bool, window: int) -> sam.Mask:
    """The position-only part of ``layers.attention_mask`` as a splash mask: causal
    (key not after query), sliding window (``|i - j| < window``), both, or neither."""
    shape = (length, length)
    if window > 0:
        return sam.LocalMask(shape, (window - 1, 0 if causal else window - 1), offset=0)
    if causal:
        return sam.CausalMask(shape)
    return sam.FullMask(shape)


def _splash_local(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    segment_ids_BxL: jax.Array,
    *,
    causal: bool,
    window: int,
    scale: float,
    interpret: bool,
) -> jax.Array:
    """One device's attention: the kernel, built for its local head count, vmapped over
    its local batch. The kernel wants ``[H, L, Dh]`` per example and does not scale q."""
    length, heads = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[2]
    kv_heads = k_BxSxKxDh.shape[2]
    block = block_size(length)
    sizes = sak.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = sam.MultiHeadMask([_static_mask(length, causal, window)] * heads)
    # MQA: one K/V head shared by every query head, kept resident by the MQA kernel.
    make = sak.make_splash_mqa if kv_heads == 1 else sak.make_splash_mha
    kernel = make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    q_BxHxLxDh = (q_BxLxHxDh * scale).astype(q_BxLxHxDh.dtype).transpose(0, 2, 1, 3)
    k_BxKxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3)
    v_BxKxSxDh = v_BxSxKxDh.transpose(0, 2, 1, 3)
    if kv_heads == 1:
        k_BxKxSxDh, v_BxKxSxDh = k_BxKxSxDh[:, 0], v_BxKxSxDh[:, 0]  # [B, S, Dh]

    def one(q: jax.Array, k: jax.Array, v: jax.Array, seg_L: jax.Array) -> jax.Array:
        return kernel(q, k, v, segment_ids=sak.SegmentIds(q=seg_L, kv=seg_L))

    out_BxHxLxDh = jax.vmap(one)(q_BxHxLxDh, k_BxKxSxDh, v_BxKxSxDh, segment_ids_BxL)
    return out_BxHxLxDh.transpose(0, 2, 1, 3)


def splash_attention(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    segment_ids_BxL: jax.Array,
    bias_BxHxLxS: jax.Array | None = None,
    *,
    causal: bool,
    window: int | None = 0,
    scale: float,
    interpret: bool = False,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> jax.Array:
    """Self-attention equal to ``layers.dot_product_attention`` with
    ``attention_mask(segment_ids, causal, window=window)``, through the splash kernel.

    Keys are the queries' own tokens (``S == L``, one ``segment_ids``); the mask compares
    token indices, so positions must count up by one within each document (as packed and
    padded batches do). ``window`` 0 or None means unlimited. Query rows of padding
    (segment 0) attend to the row's padding instead of nothing: a finite output that
    differs from the reference's, which nothing reads. ``bias_BxHxLxS`` exists only to be
    refused: the kernel adds no logit bias. ``interpret=True`` runs the kernel in Pallas'
    interpreter (any backend; for tests). ``mesh``/``rules`` default to the active ones.

    Raises ValueError for anything the kernel cannot do exactly (it pads nothing).
    """
    b, length, heads, head_dim = q_BxLxHxDh.shape
    kv_heads = k_BxSxKxDh.shape[2]
    window = window or 0
    if bias_BxHxLxS is not None:
        raise ValueError(
            "splash attention adds no logit bias, so it cannot run ALiBi or T5's relative "
            f"position bias: {_ALTERNATIVE}"
        )
    if k_BxSxKxDh.shape[1] != length or v_BxSxKxDh.shape[:3] != k_BxSxKxDh.shape[:3]:
        raise ValueError(
            f"splash attention here is self-attention (S == L): q {q_BxLxHxDh.shape}, "
            f"k {k_BxSxKxDh.shape}, v {v_BxSxKxDh.shape}; {_ALTERNATIVE}"
        )
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not groups of {kv_heads} KV heads")
    if k_BxSxKxDh.shape[3] != head_dim:
        raise ValueError(
            f"splash attention needs q and k of one head width: q {head_dim}, "
            f"k {k_BxSxKxDh.shape[3]}; {_ALTERNATIVE}"
        )
    if segment_ids_BxL.shape != (b, length):
        raise ValueError(f"segment ids {segment_ids_BxL.shape} are not [B, L] {(b, length)}")
    if window < 0:
        raise ValueError(f"window {window} is negative")
    block_size(length)  # raises for a length the blocks do not divide
    if not interpret and _backend() != "tpu":
        raise ValueError(
            "splash attention needs a TPU (or interpret=True for testing), backend is "
            f"{_backend()!r}: {_ALTERNATIVE}"
        )
    local = functools.partial(
        _splash_local, causal=causal, window=window, scale=scale, interpret=interpret
    )
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)

    return shard_splash(
        local, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxL, mesh=mesh, rules=rules
    )


@dataclasses.dataclass(frozen=True)
class Splash(Einsum):
    """``model.attention_impl=splash``: causal or windowed self-attention over a
    :class:`SegmentMask` through the kernel (which builds its own mask, so the dense one
    is never made); the einsum reference for the rest (decoding, introspection)."""

    name: str = "splash"
    interpret: bool = False  # Pallas' interpreter, for tests on CPU

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
        if isinstance(mask_BxLxS, SegmentMask) and not return_probs:
            return splash_attention(
                q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS.segment_ids_BxL, bias_BxHxLxS,
                causal=mask_BxLxS.causal, window=mask_BxLxS.window, scale=scale,
                interpret=self.interpret,
            )  # fmt: skip
        return einsum_attention(
            q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, bias_BxHxLxS,
            scale=scale, return_probs=return_probs,
        )  # fmt: skip

    def self_mask(
        self, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, causal: bool, window: int = 0
    ) -> SegmentMask:
        """Left unbuilt: the kernel makes its own from the segment ids."""
        return SegmentMask(segment_ids_BxL, positions_BxL, causal=causal, window=window)


def validate(cfg: ml_collections.ConfigDict, mesh: dict[str, int], *, causal_lm: bool) -> None:
    """What the kernel cannot run, refused before compiling: ``causal_lm`` says whether
    the family is a decoder LM (the only one the kernel is wired into)."""
    m = cfg.model
    problem = None
    if not causal_lm:
        problem = f"is wired for decoders only (model.family={m.family!r})"
    elif m.position == "alibi":
        problem = "takes no logit bias (model.position='alibi')"
    elif cfg.data.seq_len % MIN_BLOCK:
        problem = f"needs data.seq_len a multiple of {MIN_BLOCK} (got {cfg.data.seq_len})"
    elif mesh["sequence"] > 1:
        problem = "does not split the sequence (mesh.sequence > 1: ring attention does)"
    elif mesh["stage"] > 1:
        problem = "is not wired into pipeline stages (mesh.stage > 1)"
    if problem:
        raise ConfigError(
            f"config key 'model.attention_impl'='splash' {problem}; "
            "use model.attention_impl=dot_product or einsum"
        )
