"""Sequence parallelism on simulated CPU devices: ring attention equals one device's.

Rows are packed with several documents that cross the 4-token blocks of a sequence=4
mesh, plus left and right padding, so the per-block masks built from segment ids and
positions are exercised where they differ from a plain causal mask.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import parallel
from jaxformer.attention.masks import attention_mask
from jaxformer.attention.registry import dot_product_attention
from jaxformer.config import ConfigError
from jaxformer.losses import cross_entropy
from jaxformer.model.layers import alibi_bias
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import build_model, init_state, jit_steps
from jaxformer.train.validation import validate

RTOL = 1e-5
B, L = 4, 16
MESHES = {
    "sequence4": {"sequence": 4},
    "sequence2_data2": {"data": 2, "sequence": 2},
    "sequence2_tensor2": {"sequence": 2, "tensor": 2},
}
# Document lengths per row; 0 marks padding. Documents cross the 4-token blocks.
ROWS = [
    [(1, 6), (2, 7), (0, 3)],
    [(1, 3), (2, 3), (3, 10)],
    [(1, 16)],
    [(0, 5), (1, 11)],
]


def _mesh(name):
    shape = MESHES[name]
    return parallel.make_mesh(shape, jax.devices()[: math.prod(shape.values())])


def _packed_rows():
    """segment ids and positions (restarting at 0 in each document, 0 on padding)."""
    segment_ids, positions = [], []
    for row in ROWS:
        segment_ids.append(np.concatenate([np.full(n, seg) for seg, n in row]))
        positions.append(np.concatenate([np.arange(n) * (seg > 0) for seg, n in row]))
    return np.asarray(segment_ids, np.int32), np.asarray(positions, np.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# -- the ring attention function ------------------------------------------------------------

CASES = {
    "causal": dict(mesh="sequence4", causal=True, window=0, alibi=False),
    "bidirectional": dict(mesh="sequence4", causal=False, window=0, alibi=False),
    "window_alibi_heads_split": dict(mesh="sequence2_tensor2", causal=True, window=5, alibi=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_equals_dot_product_attention(case):
    """Outputs and input gradients (GQA: 4 query heads on 2 KV heads) of real query rows."""
    c = CASES[case]
    mesh = _mesh(c["mesh"])
    rng = np.random.default_rng(0)
    h, kv, dh = 4, 2, 8
    q_BxLxHxDh = rng.standard_normal((B, L, h, dh), np.float32)
    k_BxLxKxDh = rng.standard_normal((B, L, kv, dh), np.float32)
    v_BxLxKxDh = rng.standard_normal((B, L, kv, dh), np.float32)
    cotangent_BxLxHxDh = rng.standard_normal((B, L, h, dh), np.float32)
    segment_ids_BxL, positions_BxL = _packed_rows()
    # Padding queries attend to nothing; both sides give them finite values nobody reads.
    real_BxLx1x1 = (segment_ids_BxL > 0)[:, :, None, None]
    bias_BxHxLxL = alibi_bias(h, positions_BxL, positions_BxL) if c["alibi"] else None
    scale = dh**-0.5

    def reference(q, k, v):
        mask = attention_mask(
            segment_ids_BxL, c["causal"], positions_BxL=positions_BxL, window=c["window"]
        )
        return dot_product_attention(
            q, k, v, mask, bias_BxHxLxL, implementation="einsum", scale=scale
        )

    def ring(q, k, v):
        return parallel.ring_attention(
            q, k, v, segment_ids_BxL, positions_BxL, bias_BxHxLxL,
            causal=c["causal"], window=c["window"], scale=scale, mesh=mesh,
            rules=parallel.DEFAULT_RULES, block_mask=attention_mask,
        )  # fmt: skip

    def out_and_grads(attend):
        def loss(q, k, v):
            out = attend(q, k, v)
            return jnp.sum(jnp.where(real_BxLx1x1, out * cotangent_BxLxHxDh, 0.0)), out

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)

    want_grads, want = jax.jit(out_and_grads(reference))(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)
    ring_fn = jax.jit(out_and_grads(ring))
    compiled = ring_fn.lower(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh).compile()
    got_grads, got = compiled(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)

    real = np.broadcast_to(real_BxLx1x1, want.shape)
    assert _rel(np.where(real, got, 0), np.where(real, want, 0)) < RTOL
    assert np.isfinite(np.asarray(got)).all()
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        assert _rel(g, w) < RTOL, name
    # K/V travel the ring (forward and backward); nobody gathers them whole.
    hlo = compiled.as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


def test_ring_attention_needs_a_split_length():
    q = jnp.zeros((B, L, 2, 8))
    seg, pos = _packed_rows()
    with pytest.raises(ValueError, match="not split over a mesh axis"):
        parallel.ring_attention(
            q, q, q, seg, pos, causal=True, scale=1.0, mesh=_mesh("sequence4"),
            rules={**parallel.DEFAULT_RULES, "length": None}, block_mask=attention_mask,
        )  # fmt: skip


# -- a decoder LM on a sequence mesh ---------------------------------------------------------

OVERRIDES = {
    "model.num_kv_heads": 2,  # GQA
    "data.seq_len": L,
    "train.global_batch": B,
    "optimizer.eps": 1e-5,  # see tests/test_sharding.py: compares parameters at 1e-5
}


def _batch(vocab_size):
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, vocab_size, (B, L + 1)).astype(np.int32)
    segment_ids, positions = _packed_rows()
    return {
        "inputs": tokens[:, :-1] * (segment_ids > 0),
        "targets": tokens[:, 1:] * (segment_ids > 0),
        "segment_ids": segment_ids,
        "positions": positions,
        "weights": (segment_ids > 0).astype(np.float32),
    }


def _loss_and_grads(cfg, mesh, batch):
    """The mean loss and its gradients; with a mesh, also the compiled step's HLO."""
    graphdef, params = nnx.split(build_model(cfg, 0))

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(batch["inputs"], batch["segment_ids"], batch["positions"])
        loss, stats = cross_entropy(logits, batch["targets"], batch["weights"])
        return loss / stats["weight"]

    if mesh is None:
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        return float(loss), grads, ""

    def sharded(p):
        with parallel.activate(mesh):
            return jax.value_and_grad(loss_fn)(p)

    compiled = jax.jit(sharded).lower(params).compile()
    loss, grads = compiled(params)
    return float(loss), grads, compiled.as_text()


@pytest.fixture(scope="module")
def single(make_config):
    cfg = make_config(OVERRIDES)
    batch = _batch(cfg.model.vocab_size)
    return _loss_and_grads(cfg, None, batch)


@pytest.mark.parametrize("name", ["sequence4", "sequence2_data2"])
def test_decoder_loss_and_gradients_match_one_device(make_config, single, name):
    cfg = make_config(OVERRIDES)
    loss, grads, hlo = _loss_and_grads(cfg, _mesh(name), _batch(cfg.model.vocab_size))
    want_loss, want_grads, _ = single
    assert loss == pytest.approx(want_loss, rel=RTOL)
    want = dict(nnx.to_flat_state(want_grads))
    for path, g in nnx.to_flat_state(grads):
        assert _rel(g.get_value(), want[path].get_value()) < RTOL, path
    assert "collective-permute" in hlo


def test_train_step_on_a_sequence_mesh(make_config, single):
    """The real path: config validation, sharded state, the jitted train step."""
    cfg = make_config({**OVERRIDES, "mesh.sequence": 4})
    shape = validate(cfg, num_devices=4)
    assert shape["sequence"] == 4 and shape["data"] == 1
    mesh = parallel.make_mesh(shape, jax.devices()[:4])
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, parallel.DEFAULT_RULES)
    train, _ = jit_steps(cfg, graphdef, tx, mesh, parallel.DEFAULT_RULES, shardings)
    _, metrics = train(state, _batch(cfg.model.vocab_size))
    want_loss, want_grads, _ = single
    assert float(metrics["loss"]) == pytest.approx(want_loss, rel=RTOL)
    want_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(want_grads)))
    assert float(metrics["grad_norm"]) == pytest.approx(want_norm, rel=RTOL)


def test_seq_len_must_divide_over_the_sequence_axis(make_config):
    cfg = make_config({**OVERRIDES, "mesh.sequence": 4, "data.seq_len": 18})
    with pytest.raises(ConfigError, match=r"'data.seq_len' \(18\).*mesh.sequence"):
        validate(cfg, num_devices=4)
