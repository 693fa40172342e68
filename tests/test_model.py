"""The decoder: causality, packing, attention math, layer variants, counts and dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import flops
from jaxformer.attention.masks import attention_mask
from jaxformer.config import load_config
from jaxformer.losses import cross_entropy
from jaxformer.model import DecoderLM, count_params
from jaxformer.model.layers import Attention, sinusoidal
from jaxformer.parallel import DEFAULT_RULES
from jaxformer.tasks import model_config

SEQ = 16


def _build(cfg, seed=0):
    return DecoderLM(model_config(cfg.model), nnx.Rngs(params=seed))


@nnx.jit
def _forward(model, inputs, segment_ids, positions):
    return model(inputs, segment_ids, positions)


@nnx.jit
def _forward_with_key(model, inputs, segment_ids, positions, key):
    return model(inputs, segment_ids, positions, key)


def _rows(*docs, length=SEQ):
    """Packs documents (lists of token ids) into one row: segment ids 1, 2, ... and
    positions restarting at 0 per document; the rest is padding (segment 0)."""
    tokens, segments, positions = [], [], []
    for i, doc in enumerate(docs, start=1):
        tokens += list(doc)
        segments += [i] * len(doc)
        positions += list(range(len(doc)))
    pad = length - len(tokens)
    return tokens + [0] * pad, segments + [0] * pad, positions + [0] * pad


def _batch(*rows):
    return tuple(jnp.asarray([r[i] for r in rows], jnp.int32) for i in range(3))


def _params(model):
    return nnx.state(model, nnx.Param)


# -- causality and packing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model.norm_position": "post", "model.mlp": "gelu", "model.position": "learned"},
    ],
    ids=["pre-rope", "post-learned"],
)
def test_causal(make_config, overrides):
    model = _build(make_config(overrides))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 128, SEQ)
    changed = tokens.copy()
    changed[9] = (tokens[9] % 127) + 1  # a different id
    inputs = jnp.asarray(np.stack([tokens, changed]), jnp.int32)
    segments = jnp.ones((2, SEQ), jnp.int32)
    positions = jnp.tile(jnp.arange(SEQ, dtype=jnp.int32), (2, 1))
    logits = np.asarray(_forward(model, inputs, segments, positions))
    assert logits.shape == (2, SEQ, 128) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[0, :9], logits[1, :9], rtol=0, atol=1e-6)
    assert np.abs(logits[0, 9:] - logits[1, 9:]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.position": "rope"},
        {"model.position": "learned", "model.num_kv_heads": 2},
        {"model.position": "sinusoidal", "model.num_kv_heads": 1},
    ],
    ids=["rope", "learned-gqa", "sinusoidal-mqa"],
)
def test_packed_documents_are_independent(make_config, overrides):
    model = _build(make_config(overrides))
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(1, 128, 6).tolist(), rng.integers(1, 128, 7).tolist()
    packed = _rows(doc_a, doc_b)  # b at offset 6, with 3 padding tokens after it
    alone = _rows(doc_b)
    first = _rows(doc_a)
    logits = np.asarray(_forward(model, *_batch(packed, alone, first)))
    np.testing.assert_allclose(logits[0, 6:13], logits[1, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, :6], logits[2, :6], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(logits))
    # Without segment ids, b would see a: its logits change.
    tokens, _, _ = packed
    one_doc = jnp.asarray([tokens], jnp.int32), jnp.ones((1, SEQ), jnp.int32)
    seen = np.asarray(_forward(model, *one_doc, jnp.asarray([packed[2]], jnp.int32)))
    assert np.abs(seen[0, 6:13] - logits[1, :7]).max() > 1e-4


# -- attention math -----------------------------------------------------------------------


def _rope_np(x, positions, base):
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (np.arange(half) / half)
    angle = (positions[..., None] * inv_freq)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attention_matches_naive_per_head_reference(make_config, num_kv_heads):
    cfg = make_config({"model.num_heads": 4, "model.num_kv_heads": num_kv_heads})
    mcfg = model_config(cfg.model)
    attn = Attention(mcfg, nnx.Rngs(params=3))
    h, k, dh, d = 4, num_kv_heads, mcfg.head_dim, mcfg.d_model
    assert attn.k.kernel.shape == (d, k, dh) and attn.q.kernel.shape == (d, h, dh)

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, d)).astype(np.float32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))], np.int32)
    mask = attention_mask(jnp.asarray(segments), causal=True)
    got = np.asarray(attn(jnp.asarray(x), mask, jnp.asarray(positions))[0])

    w = {name: np.asarray(getattr(attn, name).kernel[...], np.float64) for name in "qkvo"}
    x64 = x.astype(np.float64)
    q = _rope_np(np.einsum("bld,dhe->blhe", x64, w["q"]), positions, mcfg.rope_base)
    kk = _rope_np(np.einsum("bld,dhe->blhe", x64, w["k"]), positions, mcfg.rope_base)
    v = np.einsum("bld,dhe->blhe", x64, w["v"])
    allowed = (segments[:, :, None] == segments[:, None, :]) & np.tril(np.ones((8, 8), bool))
    heads = []
    for head in range(h):
        kv = head // (h // k)  # query heads [kv * G, (kv + 1) * G) share KV head kv
        scores = np.einsum("bld,bsd->bls", q[:, :, head], kk[:, :, kv]) / math.sqrt(dh)
        scores = np.where(allowed, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        heads.append(np.einsum("bls,bsd->bld", probs, v[:, :, kv]))
    want = np.einsum("blhe,hed->bld", np.stack(heads, axis=2), w["o"])
    real = segments > 0  # padding queries attend to nothing; their output is unused
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_attention_mask():
    segments = jnp.asarray([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(segments, causal=True))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)
    full = np.asarray(attention_mask(segments, causal=False))[0]
    np.testing.assert_array_equal(full[:2, :2], np.ones((2, 2), bool))


def test_sinusoidal_matches_formula():
    positions = jnp.asarray([[0, 3, 7]])
    pe = np.asarray(sinusoidal(positions, 8))[0]
    p = np.array([0, 3, 7])[:, None]
    i = np.arange(4)[None]
    angle = p / 10000 ** (2 * i / 8)
    np.testing.assert_allclose(pe[:, 0::2], np.sin(angle), atol=1e-6)
    np.testing.assert_allclose(pe[:, 1::2], np.cos(angle), atol=1e-6)


# -- scan and loop layers -----------------------------------------------------------------


def test_loop_layers_start_as_the_scanned_stack_and_agree(make_config):
    # One seed, one set of weights: unrolled layers are the scanned stack's slices, so a run
    # can switch layouts (model.scan_layers) and start from the same model.
    scanned = _build(make_config({"model.num_layers": 3}))
    loop = _build(make_config({"model.num_layers": 3, "model.scan_layers": False}))
    stacked = dict(nnx.to_flat_state(_params(scanned)))
    flat_loop = list(nnx.to_flat_state(_params(loop)))
    assert len(flat_loop) == 3 * sum(p[0] == "blocks" for p in stacked) + sum(
        p[0] != "blocks" for p in stacked
    )
    for path, var in flat_loop:
        in_stack = path[0] == "blocks"
        source = stacked[("blocks", *path[2:])] if in_stack else stacked[path]
        want = source.get_value()[path[1]] if in_stack else source.get_value()
        np.testing.assert_array_equal(var.get_value(), want, err_msg=str(path))
        # The same logical axes, less the stack's leading "layers".
        axes = source.get_metadata()["out_sharding"][in_stack:]
        assert var.get_metadata()["out_sharding"] == axes, path
    rng = np.random.default_rng(3)
    batch = _batch(_rows(rng.integers(1, 128, 5), rng.integers(1, 128, 9)))
    a = np.asarray(_forward(scanned, *batch))
    b = np.asarray(_forward(loop, *batch))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- parameter counts and axis names ------------------------------------------------------

COUNT_CONFIGS = {
    "swiglu-tied-rope-rmsnorm": {},
    "gelu-untied-learned-layernorm-bias": {
        "model.mlp": "gelu",
        "model.tie_embeddings": False,
        "model.position": "learned",
        "model.norm": "layernorm",
        "model.use_bias": True,
    },
    "relu-post-sinusoidal-gqa-headdim-loop": {
        "model.mlp": "relu",
        "model.norm_position": "post",
        "model.position": "sinusoidal",
        "model.num_kv_heads": 2,
        "model.head_dim": 16,
        "model.use_bias": True,
        "model.scan_layers": False,
    },
    "swiglu-mqa-bias-layernorm-untied": {
        "model.num_kv_heads": 1,
        "model.use_bias": True,
        "model.norm": "layernorm",
        "model.tie_embeddings": False,
        "model.num_layers": 3,
    },
}


def _abstract(cfg):
    return _params(nnx.eval_shape(lambda: _build(cfg)))


def _sizes_by_leaf_name(state):
    out: dict[str, int] = {}
    for path, var in nnx.to_flat_state(state):
        out[path[-1]] = out.get(path[-1], 0) + math.prod(var.get_value().shape)
    return out


@pytest.mark.parametrize("name", list(COUNT_CONFIGS))
def test_flops_count_matches_real_parameters(make_config, name):
    cfg = make_config(COUNT_CONFIGS[name])
    state = _abstract(cfg)
    counted = flops.count(cfg.model, SEQ)
    assert counted.params == count_params(state)
    sizes = _sizes_by_leaf_name(state)
    assert counted.embedding_params == sizes["embed"] + sizes.get("pos_embed", 0)
    m = cfg.model
    output = m.vocab_size * m.d_model if m.tie_embeddings else 0
    assert counted.matmul_params == sizes["kernel"] + output
    assert counted.six_n == 6 * (counted.params - counted.embedding_params)


@pytest.mark.parametrize("name", ["default.py", "decoder_100m.py"])
def test_flops_count_of_shipped_configs(repo_root, name):
    cfg = load_config(str(repo_root / "configs" / name))
    counted = flops.count(cfg.model, cfg.data.seq_len)
    assert counted.params == count_params(_abstract(cfg))
    if name == "decoder_100m.py":
        assert 0.95e8 < counted.params < 1.05e8  # "a ~100M-parameter decoder"


def test_flops_per_token_formula(make_config):
    m = make_config(
        {
            "model.d_model": 32,
            "model.num_layers": 2,
            "model.num_heads": 4,
            "model.d_ff": 64,
            "model.vocab_size": 128,
            "model.mlp": "swiglu",
            "model.tie_embeddings": True,
        }
    ).model
    counted = flops.count(m, 16)
    matmul = 2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 128  # q, k, v, o; up, gate, down; head
    attention = 2 * 2 * 2 * 16 * 4 * 8  # layers x (QK^T + PV) x 2 FLOPs x L x heads x Dh
    assert counted.matmul_params == matmul
    assert counted.attention_flops == attention
    assert counted.train_flops_per_token == 3 * (2 * matmul + attention)


@pytest.mark.parametrize("name", list(COUNT_CONFIGS))
def test_every_parameter_has_logical_axis_names(make_config, name):
    cfg = make_config(COUNT_CONFIGS[name])
    scanned = cfg.model.scan_layers
    for path, var in nnx.to_flat_state(_abstract(cfg)):
        names = var.get_metadata().get("out_sharding")
        shape = var.get_value().shape
        assert names is not None and len(names) == len(shape), (path, names, shape)
        assert all(n in DEFAULT_RULES for n in names), (path, names)
        if path[0] == "blocks":
            assert (names[0] == "layers") == scanned, (path, names)
            if scanned:
                assert shape[0] == cfg.model.num_layers
    flat = {path: var for path, var in nnx.to_flat_state(_abstract(cfg))}
    assert flat[("embed",)].get_metadata()["out_sharding"] == ("vocab", "embed")


# -- remat, dtypes, dropout ---------------------------------------------------------------


def _loss_and_grads(model, batch, key):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params, key):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(*batch[:3], key)
            loss, stats = cross_entropy(logits, batch[3], jnp.ones(batch[3].shape))
            return loss / stats["weight"]

        return jax.value_and_grad(loss_fn)(params)

    return run(params, key)


def _lm_batch(seed, batch_size=2):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 128, (batch_size, SEQ + 1))
    return (
        jnp.asarray(tokens[:, :-1], jnp.int32),
        jnp.ones((batch_size, SEQ), jnp.int32),
        jnp.tile(jnp.arange(SEQ, dtype=jnp.int32), (batch_size, 1)),
        jnp.asarray(tokens[:, 1:], jnp.int32),
    )


@pytest.fixture(scope="module")
def remat_reference(make_config):
    """Loss and gradients without remat, with dropout on (remat must replay its masks)."""
    cfg = make_config({"model.dropout": 0.1})
    batch, key = _lm_batch(4), jax.random.key(7)
    return cfg, batch, key, _loss_and_grads(_build(cfg), batch, key)


def _stacked(state):
    """{path: array} with per-layer block leaves stacked as the scanned model stores them."""
    out, layers = {}, {}
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(var.get_value())
        if path[0] == "blocks" and isinstance(path[1], int):
            layers.setdefault(("blocks", *path[2:]), {})[path[1]] = value
        else:
            out[path] = value
    for path, by_layer in layers.items():
        out[path] = np.stack([by_layer[i] for i in sorted(by_layer)])
    return out


@pytest.mark.parametrize(
    ("remat", "scan"),
    [
        ("full", True),
        ("dots", True),
        ("dots_no_batch", True),
        ("dots_attention", True),
        ("qkv", True),
        ("none", False),
        ("full", False),
    ],
)
def test_remat_gives_same_loss_and_grads(make_config, remat_reference, remat, scan):
    _, batch, key, (loss, grads) = remat_reference
    model = _build(
        make_config({"model.dropout": 0.1, "model.remat": remat, "model.scan_layers": scan})
    )
    got_loss, got_grads = _loss_and_grads(model, batch, key)
    assert float(got_loss) == pytest.approx(float(loss), rel=1e-6)
    got, want = _stacked(got_grads), _stacked(grads)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_bfloat16_compute_keeps_float32_params(make_config, remat_reference):
    cfg32, batch, _, _ = remat_reference
    model16 = _build(make_config({"model.dropout": 0.1, "model.dtype": "bfloat16"}))
    model32 = _build(cfg32)
    for a, b in zip(
        jax.tree.leaves(_params(model16)), jax.tree.leaves(_params(model32)), strict=True
    ):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)  # the same init: dtype only changes compute
    logits = _forward(model16, *batch[:3])
    assert logits.dtype == jnp.float32
    loss16, grads16 = _loss_and_grads(model16, batch, None)
    loss32, _ = _loss_and_grads(model32, batch, None)
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    assert abs(float(loss16) - float(loss32)) > 0  # it did compute in bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))


def test_dropout_only_with_a_key(make_config):
    model = _build(make_config({"model.dropout": 0.3}))
    plain = _build(make_config({"model.dropout": 0.0}))
    batch = _lm_batch(5)[:3]
    no_key = np.asarray(_forward(model, *batch))
    np.testing.assert_array_equal(no_key, np.asarray(_forward(plain, *batch)))
    k1 = np.asarray(_forward_with_key(model, *batch, jax.random.key(1)))
    k1_again = np.asarray(_forward_with_key(model, *batch, jax.random.key(1)))
    k2 = np.asarray(_forward_with_key(model, *batch, jax.random.key(2)))
    np.testing.assert_array_equal(k1, k1_again)
    assert np.abs(k1 - no_key).max() > 1e-3
    assert np.abs(k1 - k2).max() > 1e-3
    # A model built with dropout 0 ignores the key.
    with_key = np.asarray(_forward_with_key(plain, *batch, jax.random.key(1)))
    np.testing.assert_array_equal(with_key, no_key)


def test_dots_attention_saves_the_fused_attention_forward_and_nothing_else_new():
    """remat=dots_attention keeps what dots_no_batch keeps, plus the outputs of jax's cuDNN
    attention forward (the primitive itself only runs on GPUs)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from jaxformer.model.remat import REMAT_POLICIES, fused_attention_outputs

    assert fused_attention_outputs(cudnn._dot_product_attention_fwd_p_wrapper)
    assert fused_attention_outputs(cudnn._dot_product_attention_fwd_p)
    assert not fused_attention_outputs(jax.lax.exp_p)
    assert not fused_attention_outputs(jax.lax.dot_general_p)
    policy = REMAT_POLICIES["dots_attention"]
    assert policy(cudnn._dot_product_attention_fwd_p_wrapper)
    assert not policy(jax.lax.exp_p)
