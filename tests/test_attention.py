"""Attention options: ALiBi, sliding windows, the fused implementation, the KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import base_config
from jaxformer.model import DecoderLM, ModelConfig
from jaxformer.model.layers import alibi_bias, alibi_slopes, attention_mask

B, L, V = 2, 12, 64


def tiny_model(**overrides: object) -> DecoderLM:
    cfg = base_config().model
    cfg.update(dict(d_model=32, num_heads=4, d_ff=64, num_layers=2, vocab_size=V, max_len=32))
    cfg.update(overrides)
    return DecoderLM(ModelConfig.from_config(cfg), nnx.Rngs(params=0))


def packed_batch() -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens = jax.random.randint(jax.random.key(1), (B, L), 3, V)
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


@pytest.mark.parametrize(
    "options",
    [{}, {"num_kv_heads": 1}, {"position": "alibi", "num_kv_heads": 2}, {"sliding_window": 4}],
)
def test_dot_product_attention_matches_einsum(options: dict) -> None:
    tokens, segments, positions = packed_batch()
    weights = (segments > 0).astype(jnp.float32)

    def loss_and_grads(impl: str) -> tuple[jax.Array, nnx.State]:
        model = tiny_model(attention_impl=impl, **options)
        graphdef, params = nnx.split(model)

        def loss(p: nnx.State) -> jax.Array:
            logits = nnx.merge(graphdef, p)(tokens, segments, positions)
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
            return (nll * weights).sum()

        return jax.value_and_grad(loss)(params)

    ref_loss, ref_grads = loss_and_grads("einsum")
    loss, grads = loss_and_grads("dot_product")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


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
