"""Attention options: ALiBi, sliding windows, the fused implementation, the KV cache."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import dot_product, masks, registry
from jaxformer.attention.masks import attention_mask
from jaxformer.config import base_config
from jaxformer.model import DecoderLM
from jaxformer.model.layers import alibi_bias, alibi_slopes
from jaxformer.tasks import model_config

B, L, V = 2, 12, 64


def tiny_model(**overrides: object) -> DecoderLM:
    cfg = base_config().model
    cfg.update(dict(d_model=32, num_heads=4, d_ff=64, num_layers=2, vocab_size=V, max_len=32))
    cfg.update(overrides)
    return DecoderLM(model_config(cfg), nnx.Rngs(params=0))


def packed_batch(packed: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row 0 packs two documents and a padding token (unless ``packed=False``: then every
    row is one whole document); row 1 is one document."""
    tokens = jax.random.randint(jax.random.key(1), (B, L), 3, V)
    if not packed:
        return tokens, jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L), (B, L))
    segments = jnp.asarray([[1] * 5 + [2] * 6 + [0], [1] * L], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(6)) + [0], list(range(L))], jnp.int32)
    return tokens, segments, positions


def test_alibi_slopes_follow_press_et_al() -> None:
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(k + 1) for k in range(8)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** (-2 * (k + 1)) for k in range(4)])
    # 6 heads: the 4-head slopes, then every other slope of the 8-head geometric sequence.
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    np.testing.assert_allclose(alibi_slopes(6), expected)


def test_alibi_bias_is_minus_slope_times_distance() -> None:
    positions = jnp.asarray([[0, 1, 2, 3]])
    bias = np.asarray(alibi_bias(2, positions, positions))[0]
    distance = np.abs(np.arange(4)[:, None] - np.arange(4)[None, :])
    np.testing.assert_allclose(bias[0], -(2.0**-4) * distance)
    np.testing.assert_allclose(bias[1], -(2.0**-8) * distance)


def test_sliding_window_mask() -> None:
    segments = jnp.ones((1, 6), jnp.int32)
    mask = np.asarray(attention_mask(segments, causal=True, window=3))[0]
    i, j = np.arange(6)[:, None], np.arange(6)[None, :]
    np.testing.assert_array_equal(mask, (j <= i) & (i - j < 3))


def test_sliding_window_limits_what_a_token_sees() -> None:
    tokens, segments, positions = packed_batch()
    windowed = tiny_model(sliding_window=3)
    logits = windowed(tokens, segments, positions)
    # Changing a token 3 or more positions back does not change the logits.
    changed = tokens.at[1, 2].set((tokens[1, 2] + 1) % V)
    after = windowed(changed, segments, positions)
    # With 2 layers the receptive field is 2 * (window - 1) = 4 positions.
    np.testing.assert_array_equal(np.asarray(after[1, 7:]), np.asarray(logits[1, 7:]))
    assert not np.allclose(np.asarray(after[1, 2]), np.asarray(logits[1, 2]))
    # A window covering the whole sequence is no window at all.
    full = tiny_model(sliding_window=L)(tokens, segments, positions)
    np.testing.assert_allclose(full, tiny_model()(tokens, segments, positions), atol=1e-6)


def test_alibi_attention_matches_naive_reference() -> None:
    model = tiny_model(position="alibi", num_layers=1, num_kv_heads=2)
    tokens, segments, positions = packed_batch()
    x = jnp.take(model.embed[...], tokens, axis=0)
    block = jax.tree.map(lambda a: a[0], nnx.state(model.blocks))
    layer = nnx.merge(nnx.graphdef(model.blocks), block)
    mask = attention_mask(segments, causal=True, positions_BxL=positions)
    got = np.asarray(layer.attn(layer.attn_norm(x), mask, positions)[0])

    h = np.asarray(layer.attn_norm(x), np.float64)
    w = {n: np.asarray(getattr(layer.attn, n).kernel[...], np.float64) for n in "qkvo"}
    q, k, v = (np.einsum("bld,dhe->blhe", h, w[n]) for n in "qkv")
    slopes = [2.0 ** (-8 * (i + 1) / 4) for i in range(4)]
    pos = np.asarray(positions)
    allowed = (np.asarray(segments)[:, :, None] == np.asarray(segments)[:, None, :]) & (
        pos[:, :, None] >= pos[:, None, :]
    )
    heads = []
    for head in range(4):
        kv = head // 2
        scores = np.einsum("bld,bsd->bls", q[:, :, head], k[:, :, kv]) / math.sqrt(8)
        scores -= slopes[head] * np.abs(pos[:, :, None] - pos[:, None, :])
        scores = np.where(allowed, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append(np.einsum("bls,bsd->bld", probs / probs.sum(-1, keepdims=True), v[:, :, kv]))
    want = np.einsum("blhe,hed->bld", np.stack(heads, axis=2), w["o"])
    real = np.asarray(segments) > 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)


def _dot_product_vs_einsum(dtype: str, options: dict, packed: bool = True) -> tuple:
    """(loss, grads) of attention_impl=dot_product and of einsum on :func:`packed_batch`."""
    tokens, segments, positions = packed_batch(packed)
    weights = (segments > 0).astype(jnp.float32)

    def loss_and_grads(impl: str) -> tuple[jax.Array, nnx.State]:
        graphdef, params = nnx.split(tiny_model(attention_impl=impl, dtype=dtype, **options))

        def loss(p: nnx.State) -> jax.Array:
            logits = nnx.merge(graphdef, p)(tokens, segments, positions)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)
            return (nll[..., 0] * weights).sum()

        return jax.value_and_grad(loss)(params)

    return loss_and_grads("dot_product"), loss_and_grads("einsum")


def _assert_same_loss_and_grads(got: tuple, want: tuple) -> None:
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{}, {"num_kv_heads": 1}, {"position": "alibi", "num_kv_heads": 2}, {"sliding_window": 4}],
)
def test_dot_product_attention_matches_einsum(options: dict) -> None:
    _assert_same_loss_and_grads(*_dot_product_vs_einsum("float32", options))


def test_sdpa_backend_asks_for_cudnn_only_where_it_runs() -> None:
    # jax.nn.dot_product_attention runs XLA's unfused attention unless cuDNN is named.
    assert dot_product.sdpa_backend("gpu", jnp.bfloat16, 128) == "cudnn"
    assert dot_product.sdpa_backend("gpu", "float16", 64) == "cudnn"
    assert dot_product.sdpa_backend("gpu", "float32", 64) == "xla"  # cuDNN's kernel: 16-bit
    assert dot_product.sdpa_backend("gpu", jnp.bfloat16, 100) == "xla"  # not a multiple of 8
    assert dot_product.sdpa_backend("gpu", jnp.bfloat16, 256) == "xla"
    assert dot_product.sdpa_backend("cpu", jnp.bfloat16, 64) == "xla"
    assert dot_product.sdpa_backend("tpu", jnp.bfloat16, 64) == "xla"


def test_auto_attention_is_cudnn_where_it_runs_and_the_einsum_reference_elsewhere() -> None:
    assert base_config().model.attention_impl == "auto"  # the default
    resolve = functools.partial(registry.attention_implementation, causal_self=True)
    assert resolve("auto", jnp.bfloat16, 64, platform="gpu") == "dot_product"
    assert resolve("auto", jnp.float32, 64, platform="gpu") == "einsum"  # cuDNN: 16-bit
    assert resolve("auto", jnp.bfloat16, 256, platform="gpu") == "einsum"
    assert resolve("auto", jnp.bfloat16, 64, platform="cpu") == "einsum"
    assert resolve("auto", jnp.bfloat16, 64, platform="tpu") == "einsum"  # splash by name
    # Encoders, cross-attention and biased logits keep the reference unless asked.
    assert resolve("auto", jnp.bfloat16, 64, causal_self=False, platform="gpu") == "einsum"
    for name in ("einsum", "dot_product", "splash"):
        assert resolve(name, jnp.bfloat16, 64, causal_self=False, platform="gpu") == name


def test_dot_product_falls_back_to_xla_when_cudnn_refuses(monkeypatch, caplog) -> None:
    """Asked for cuDNN where it cannot run (here: no GPU), the step still runs, on XLA's
    attention, equal to the einsum reference, and says why."""
    monkeypatch.setattr(dot_product, "sdpa_backend", lambda *args: "cudnn")
    with caplog.at_level("WARNING", logger="jaxformer"):
        got, want = _dot_product_vs_einsum("float32", {})
    assert "cuDNN attention refused" in caplog.text
    _assert_same_loss_and_grads(got, want)


@pytest.mark.parametrize("packed", [True, False])
def test_cudnn_path_drops_the_mask_only_for_rows_of_one_whole_document(
    monkeypatch, packed: bool
) -> None:
    """On the cuDNN path causal self-attention branches at run time: with no packing and
    no padding, is_causal alone; otherwise the segment mask. Both equal the einsum path
    (here the branches run XLA's attention: cuDNN needs a GPU)."""
    monkeypatch.setattr(dot_product, "sdpa_backend", lambda *args: "cudnn")
    _assert_same_loss_and_grads(*_dot_product_vs_einsum("float32", {}, packed))


def test_one_document_per_row_needs_one_segment_no_padding_and_consecutive_positions() -> None:
    def check(segments: list, positions: list) -> bool:
        mask = masks.SegmentMask(jnp.asarray(segments), jnp.asarray(positions))
        return bool(mask.one_document_per_row())

    assert check([[1, 1, 1], [3, 3, 3]], [[0, 1, 2], [5, 6, 7]])
    assert not check([[1, 1, 2], [1, 1, 1]], [[0, 1, 0], [0, 1, 2]])  # packed
    assert not check([[1, 1, 0], [1, 1, 1]], [[0, 1, 0], [0, 1, 2]])  # padding
    assert not check([[1, 1, 1], [1, 1, 1]], [[0, 2, 3], [0, 1, 2]])  # a gap in positions


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize(
    "options, packed",
    [({}, True), ({}, False), ({"num_kv_heads": 2}, True), ({"num_kv_heads": 2}, False),
     ({"sliding_window": 4}, True), ({"remat": "dots_attention"}, True),
     ({"remat": "dots_attention"}, False)],
)  # fmt: skip
def test_cudnn_attention_matches_einsum_in_bf16(options: dict, packed: bool, caplog) -> None:
    assert dot_product.sdpa_backend("gpu", jnp.bfloat16, 8) == "cudnn"
    with caplog.at_level("WARNING", logger="jaxformer"):
        (loss, grads), (ref_loss, ref_grads) = _dot_product_vs_einsum("bfloat16", options, packed)
    assert "refused" not in caplog.text  # cuDNN ran, not the fallback
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * float(jnp.abs(b).max()))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scan_layers": False},
        {"position": "alibi"},
        {"position": "learned", "sliding_window": 4},
    ],
)
def test_kv_cache_reproduces_the_full_forward(options: dict) -> None:
    model = tiny_model(**options)
    tokens = jax.random.randint(jax.random.key(2), (B, L), 3, V)
    segments = jnp.ones((B, L), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    full = model(tokens, segments, positions)
    cache = model.init_cache(B, 16, jnp.float32)
    logits, cache = model.decode(tokens[:, :5], segments[:, :5], positions[:, :5], cache)
    steps = [logits]
    for t in range(5, L):
        logits, cache = model.decode(
            tokens[:, t : t + 1], segments[:, t : t + 1], positions[:, t : t + 1], cache
        )
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == L


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
def test_dots_attention_runs_the_cudnn_forward_once_per_step() -> None:
    """With remat=dots_no_batch the backward reruns cuDNN's attention forward; with
    dots_attention its outputs are kept and the compiled step calls it fewer times."""
    tokens, segments, positions = packed_batch(packed=False)

    def forward_calls(remat: str) -> int:
        model = tiny_model(attention_impl="dot_product", dtype="bfloat16", remat=remat)
        graphdef, params = nnx.split(model)

        def loss(p: nnx.State) -> jax.Array:
            return nnx.merge(graphdef, p)(tokens, segments, positions).sum()

        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        targets = re.findall(r"__cudnn\$fmha(\w*)", hlo)  # forward and backward kernels
        return sum(not t.endswith("Backward") for t in targets)

    kept, rerun = forward_calls("dots_attention"), forward_calls("dots_no_batch")
    assert 0 < kept < rerun
