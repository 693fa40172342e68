"""Splash attention (jaxformer.attention.splash) against the einsum reference.

The Pallas TPU kernel runs here in interpret mode (``interpret=True``) on CPU: the same
kernel code, blocks and masks, executed by Pallas' interpreter. Shapes are the smallest
the kernel takes: lengths of two 128-blocks, head width 128.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxformer import parallel
from jaxformer.attention import splash as splash_module
from jaxformer.attention.masks import attention_mask
from jaxformer.attention.registry import dot_product_attention
from jaxformer.attention.splash import splash_attention
from jaxformer.tasks import model_config
from jaxformer.train.validation import validate

B, L, H, DH = 2, 256, 4, 128
SCALE = DH**-0.5


def _segments() -> tuple[jax.Array, jax.Array]:
    """Row 0 packs two documents (100 + 156 tokens), row 1 one of 200 and 56 of padding;
    positions restart at 0 for each document, as the packers write them."""
    seg_BxL = np.ones((B, L), np.int32)
    seg_BxL[0, 100:] = 2
    seg_BxL[1, 200:] = 0
    pos_BxL = np.zeros((B, L), np.int32)
    for b in range(B):
        for i in range(1, L):
            pos_BxL[b, i] = 0 if seg_BxL[b, i] != seg_BxL[b, i - 1] else pos_BxL[b, i - 1] + 1
    return jnp.asarray(seg_BxL), jnp.asarray(pos_BxL)


def _qkv(kv_heads: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, L, H, DH), jnp.float32),
        jax.random.normal(kk, (B, L, kv_heads, DH), jnp.float32),
        jax.random.normal(kv, (B, L, kv_heads, DH), jnp.float32),
    )


def _out_and_grads(attend, q, k, v, seg_BxL) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The output and d(sum(out * ct))/d(q, k, v) for a fixed random cotangent that is
    zero on padding rows: their outputs differ by design (nothing reads them)."""
    real_BxLx1x1 = (seg_BxL > 0)[:, :, None, None]
    ct = jax.random.normal(jax.random.key(7), q.shape) * real_BxLx1x1

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(attend, q, k, v)
        return out * real_BxLx1x1, vjp(ct)

    return run(q, k, v)


@pytest.mark.parametrize(
    "kv_heads, causal, window",
    [
        (4, True, 0),  # MHA, causal, packed documents and padding
        (2, True, 0),  # GQA
        (1, True, 64),  # MQA, causal sliding window
        (2, False, 0),  # bidirectional (encoder)
        (4, False, 48),  # bidirectional sliding window
    ],
)
def test_matches_einsum_reference(kv_heads: int, causal: bool, window: int) -> None:
    q, k, v = _qkv(kv_heads)
    seg_BxL, pos_BxL = _segments()
    mask_BxLxS = attention_mask(seg_BxL, causal, positions_BxL=pos_BxL, window=window)

    def reference(q, k, v):
        return dot_product_attention(
            q, k, v, mask_BxLxS, None, implementation="einsum", scale=SCALE
        )

    def splash(q, k, v):
        return splash_attention(
            q, k, v, seg_BxL, causal=causal, window=window, scale=SCALE, interpret=True
        )

    want_out, want_grads = _out_and_grads(reference, q, k, v, seg_BxL)
    got_out, got_grads = _out_and_grads(splash, q, k, v, seg_BxL)
    # float32 throughout; only the summation order differs (online softmax over blocks).
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "mesh_shape, kv_heads",
    [({"data": 2}, 2), ({"tensor": 2}, 2), ({"tensor": 2}, 1)],
    ids=["data2", "tensor2-gqa", "tensor2-mqa"],
)
def test_under_a_mesh_matches_one_device(mesh_shape: dict[str, int], kv_heads: int) -> None:
    """Batch and heads split over the mesh: the kernel runs per device in a shard_map
    and gives the single-device output and gradients (MQA: queries split, K/V whole)."""
    q, k, v = _qkv(kv_heads, seed=1)
    seg_BxL, _ = _segments()

    def splash(q, k, v):
        return splash_attention(q, k, v, seg_BxL, causal=True, scale=SCALE, interpret=True)

    want_out, want_grads = _out_and_grads(splash, q, k, v, seg_BxL)
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[:2])
    with parallel.activate(mesh):
        assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
        got_out, got_grads = _out_and_grads(splash, q, k, v, seg_BxL)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-6, atol=1e-6)
    for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
        # MQA's dk/dv are summed over the devices' query heads: another summation order.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_lowers_to_mosaic_for_tpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real (non-interpret) path lowers to TPU custom calls from this CPU machine:
    forward, dq and dkv kernels, in bfloat16 with GQA and a head width of 64."""
    monkeypatch.setattr(splash_module, "_backend", lambda: "tpu")
    q = jax.ShapeDtypeStruct((B, L, H, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, L, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def loss(q, k, v, seg_BxL):
        out = splash_attention(q, k, v, seg_BxL, causal=True, window=128, scale=0.125)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


def _call(length: int = L, **kwargs) -> jax.Array:
    q = jnp.zeros((1, length, 2, DH))
    k = jnp.zeros((1, length, 2, DH))
    seg = jnp.ones((1, length), jnp.int32)
    args = {"causal": True, "scale": SCALE, "interpret": True, **kwargs}
    return splash_attention(q, k, k, seg, **args)


def test_refuses_length_not_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match=r"multiple of 128, got 200.*attention_impl=dot_product"):
        _call(length=200)


def test_refuses_a_logit_bias() -> None:
    with pytest.raises(ValueError, match=r"ALiBi.*attention_impl=dot_product or einsum"):
        _call(bias_BxHxLxS=jnp.zeros((1, 2, L, L)))


def test_refuses_cpu_without_interpret() -> None:
    with pytest.raises(ValueError, match=r"needs a TPU \(or interpret=True for testing\)"):
        _call(interpret=False)


def test_refuses_cross_attention() -> None:
    q = jnp.zeros((1, L, 2, DH))
    k = jnp.zeros((1, 2 * L, 2, DH))
    with pytest.raises(ValueError, match=r"self-attention \(S == L\)"):
        splash_attention(q, k, k, jnp.ones((1, L), jnp.int32), causal=False, scale=1.0)


def test_refuses_sequence_parallelism() -> None:
    mesh = parallel.make_mesh({"data": 1, "sequence": 2}, jax.devices()[:2])
    with parallel.activate(mesh), pytest.raises(ValueError, match="sequence parallelism"):
        _call()


def test_sharded_specs_cover_batch_and_heads() -> None:
    """data x tensor: the shard_map splits the batch over data and both head axes over
    tensor (GQA, 4 query heads over 2 KV heads)."""
    q, k, v = _qkv(2, seed=2)
    seg_BxL, _ = _segments()
    mesh = parallel.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    with parallel.activate(mesh):
        jaxpr = jax.make_jaxpr(
            lambda q, k, v: splash_attention(
                q, k, v, seg_BxL, causal=True, scale=1.0, interpret=True
            )
        )(q, k, v)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    heads = PartitionSpec("data", None, "tensor", None)
    # The kernel's block tables (constants, replicated) come first, then q, k, v, segments.
    assert eqn.params["in_specs"][-4:] == (heads, heads, heads, PartitionSpec("data", None))
    assert eqn.params["out_specs"] == (heads,)


def test_decoder_with_splash_matches_einsum(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.attention_impl=splash end to end: a decoder's loss and gradients equal the
    einsum decoder's (the kernel in interpret mode, as on CPU it must be)."""
    from flax import nnx

    from jaxformer.config import ConfigError
    from jaxformer.model import DecoderLM, ModelConfig

    # The kernel in Pallas' interpreter, as on CPU it must be.
    backends = {"einsum": None, "splash": splash_module.Splash(interpret=True)}
    overrides = {
        "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 64,
        "model.max_len": 128, "data.seq_len": 128, "model.sliding_window": 64,
    }  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 128)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 80 + [2] * 48], 2, axis=0), jnp.int32)
    positions = jnp.concatenate([jnp.arange(80), jnp.arange(48)])[None].repeat(2, 0)

    def loss_and_grads(impl: str):
        cfg = make_config({**overrides, "model.attention_impl": impl})
        validate(cfg, 1)
        attention = backends[impl]
        mcfg = (
            model_config(cfg.model)
            if attention is None
            else ModelConfig.from_config(cfg.model, attention)
        )
        model = DecoderLM(mcfg, nnx.Rngs(params=0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, segments, positions)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.value_and_grad(loss)(params)

    (want, want_grads), (got, got_grads) = loss_and_grads("einsum"), loss_and_grads("splash")
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of 128"):
        validate(
            make_config({**overrides, "model.attention_impl": "splash", "data.seq_len": 96}), 1
        )
