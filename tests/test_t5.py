"""T5: exact parameter counts, T5's position buckets, and float32 parity with tiny random
``transformers`` T5 models (1.0 and 1.1 style) in both directions; packed pairs stay apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import load_config
from jaxformer.model.t5 import T5, relative_position_bucket
from jaxformer.tasks import model_config

VOCAB, SRC, TGT = 128, 24, 20
RTOL = 1e-4


@pytest.mark.parametrize(
    ("size", "count"),
    [("small", 60_506_624), ("base", 222_903_552), ("large", 737_668_096)],
)
def test_param_counts(size: str, count: int) -> None:
    m = model_config(load_config(f"configs/t5_{size}.py").model)
    abstract = nnx.eval_shape(lambda: T5(m, nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in leaves) == count


def test_buckets() -> None:
    bi = {0: 0, -1: 1, 1: 17, -7: 7, 7: 23, -8: 8, -12: 9, -16: 10, -32: 12, -64: 14,
          -127: 15, -1000: 15, 1000: 31, 16: 26}  # fmt: skip
    uni = {5: 0, 0: 0, -5: 5, -15: 15, -16: 16, -32: 21, -64: 26, -100: 30, -128: 31,
           -5000: 31}  # fmt: skip
    for table, bidirectional in ((bi, True), (uni, False)):
        rel = jnp.asarray(list(table), jnp.int32)
        got = relative_position_bucket(rel, bidirectional, 32, 128)
        assert dict(zip(table, np.asarray(got).tolist(), strict=True)) == table


def test_dropout_and_gradients() -> None:
    """Training mode (dropout on, rematerialised scan) gives finite logits and gradients."""
    c = load_config("configs/t5_small.py")
    m = c.model
    m.vocab_size, m.d_model, m.d_ff, m.num_heads, m.head_dim = 64, 32, 64, 4, 8
    m.num_layers = m.num_encoder_layers = 2
    m.dropout, m.remat, m.dtype = 0.1, "full", "float32"
    model = T5(model_config(m), nnx.Rngs(0))
    b, s, t = 2, 12, 10
    segs = jnp.asarray([[1] * 6 + [2] * 6] * b, jnp.int32)
    pos = jnp.asarray([list(range(6)) * 2] * b, jnp.int32)
    batch = {
        "encoder_inputs": jnp.ones((b, s), jnp.int32), "encoder_segment_ids": segs,
        "encoder_positions": pos, "inputs": jnp.ones((b, t), jnp.int32),
        "segment_ids": segs[:, :t], "positions": pos[:, :t],
    }  # fmt: skip

    def loss(model: T5) -> jax.Array:
        return model.apply_batch(batch, jax.random.key(0))[0].mean()

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    table = np.asarray(grads["decoder_relative_bias"]["table"][...])
    assert np.abs(table).max() > 0


# -- Hugging Face parity -------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from jaxformer.hf import t5 as hf_t5  # noqa: E402


def _hf_t5(style: str) -> Any:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="relu" if style == "1.0" else "gated-gelu",
        tie_word_embeddings=style == "1.0", dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0 if style == "1.0" else 1)
    model = transformers.T5ForConditionalGeneration(config)
    if style == "1.1":  # transformers ties T5's head whatever the config says: untie it
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def hf_model(request: pytest.FixtureRequest) -> Any:
    return _hf_t5(request.param)


def _batch(rng: np.random.Generator, b: int = 2) -> dict[str, jax.Array]:
    src = rng.integers(0, VOCAB, (b, SRC)).astype(np.int32)
    tgt = rng.integers(0, VOCAB, (b, TGT)).astype(np.int32)
    return {
        "encoder_inputs": jnp.asarray(src),
        "encoder_segment_ids": jnp.ones((b, SRC), jnp.int32),
        "encoder_positions": jnp.broadcast_to(jnp.arange(SRC, dtype=jnp.int32), (b, SRC)),
        "inputs": jnp.asarray(tgt),
        "segment_ids": jnp.ones((b, TGT), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(TGT, dtype=jnp.int32), (b, TGT)),
    }


@nnx.jit
def _logits(model: T5, batch: dict[str, jax.Array]) -> jax.Array:
    return model.apply_batch(batch)[0]


def _hf_logits(model: Any, batch: dict[str, jax.Array]) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(batch["encoder_inputs"]).astype(np.int64)),
            decoder_input_ids=torch.from_numpy(np.asarray(batch["inputs"]).astype(np.int64)),
        )
    return out.logits.float().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_import_matches_transformers(hf_model: Any) -> None:
    cfg = hf_t5.config_from_hf_t5(hf_model.config)
    assert cfg.model.tie_embeddings == (hf_model.config.feed_forward_proj == "relu")
    model = hf_t5.import_hf_t5(hf_model, cfg)
    batch = _batch(np.random.default_rng(0))
    assert _rel(np.asarray(_logits(model, batch)), _hf_logits(hf_model, batch)) < RTOL


def test_export_roundtrip(hf_model: Any, tmp_path: Any) -> None:
    model = hf_t5.import_hf_t5(hf_model, hf_t5.config_from_hf_t5(hf_model.config))
    exported = hf_t5.export_hf_t5(model, attn_implementation="eager")
    exported.save_pretrained(tmp_path)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    batch = _batch(np.random.default_rng(1))
    want = np.asarray(_logits(model, batch))
    assert _rel(_hf_logits(reloaded, batch), want) < RTOL
    again = hf_t5.import_hf_t5(reloaded)
    assert _rel(np.asarray(_logits(again, batch)), want) < RTOL


def test_packed_pairs_do_not_see_each_other(hf_model: Any) -> None:
    """Two pairs packed in one row give each pair's own logits, positions restarting."""
    model = hf_t5.import_hf_t5(hf_model)
    rng = np.random.default_rng(2)
    one, two = _batch(rng, 1), _batch(rng, 1)
    s1, t1 = 10, 8  # lengths of the first pair inside the packed row
    s2, t2 = SRC - s1, TGT - t1

    def cat(key: str, n1: int, n2: int) -> jax.Array:
        return jnp.concatenate([one[key][:, :n1], two[key][:, :n2]], axis=1)

    packed = {
        "encoder_inputs": cat("encoder_inputs", s1, s2),
        "encoder_segment_ids": jnp.asarray([[1] * s1 + [2] * s2], jnp.int32),
        "encoder_positions": jnp.asarray([list(range(s1)) + list(range(s2))], jnp.int32),
        "inputs": cat("inputs", t1, t2),
        "segment_ids": jnp.asarray([[1] * t1 + [2] * t2], jnp.int32),
        "positions": jnp.asarray([list(range(t1)) + list(range(t2))], jnp.int32),
    }
    got = np.asarray(_logits(model, packed))[0]

    def alone(pair: dict[str, jax.Array], s: int, t: int) -> np.ndarray:
        cut = {k: v[:, : (s if k.startswith("encoder") else t)] for k, v in pair.items()}
        return np.asarray(_logits(model, cut))[0]

    assert _rel(got[:t1], alone(one, s1, t1)) < 1e-5
    assert _rel(got[t1:], alone(two, s2, t2)) < 1e-5
    hf_first = {"encoder_inputs": one["encoder_inputs"][:, :s1], "inputs": one["inputs"][:, :t1]}
    assert _rel(got[:t1], _hf_logits(hf_model, hf_first)[0]) < RTOL


def test_span_corruption_pretraining_through_jaxformer_train(repo_root, tmp_path) -> None:
    """configs/t5.py at a tiny size on the built-in corpus: held-out loss falls."""
    from jaxformer.config import load_config
    from jaxformer.train.logs import read_metrics
    from jaxformer.train.loop import train

    overrides = [
        "--config.model.d_model=32", "--config.model.num_layers=1",
        "--config.model.num_encoder_layers=1", "--config.model.num_heads=2",
        "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.model.vocab_size=384",
        "--config.model.max_len=64", "--config.model.dtype=float32",
        "--config.data.tokenizer=byte", "--config.data.spm_model=",
        "--config.data.source_seq_len=64",
        "--config.data.seq_len=16", "--config.train.global_batch=8", "--config.train.steps=40",
        "--config.train.microbatches=1", "--config.train.log_every=10",
        "--config.train.eval_every=40", "--config.train.eval_batches=4",
        "--config.optimizer.name=adamw", "--config.optimizer.schedule=constant",
        "--config.optimizer.lr=3e-3", "--config.optimizer.warmup_steps=0",
        "--config.mesh.data=-1", "--config.mesh.fsdp=1", f"--config.train.run_dir={tmp_path}",
    ]  # fmt: skip
    train(load_config(str(repo_root / "configs/t5.py"), overrides))
    evals = [r["loss"] for r in read_metrics(tmp_path, "eval")]
    assert evals[-1] < evals[0] - 1.0


def test_cached_greedy_equals_transformers_generate(hf_model: Any) -> None:
    """Imported weights, KV-cache greedy decoding from the decoder start (pad, 0) to eos
    (1): the tokens of ``transformers``' ``generate``."""
    from jaxformer import decode

    model = hf_t5.import_hf_t5(hf_model)
    rng = np.random.default_rng(3)
    sources = rng.integers(2, VOCAB, (3, SRC)).astype(np.int32)
    sources[1, SRC // 2 :] = 0  # a shorter source, right-padded
    mask = sources > 0
    new = 12
    with torch.no_grad():
        expected = hf_model.generate(
            input_ids=torch.from_numpy(sources.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=new, do_sample=False, num_beams=1, decoder_start_token_id=0,
            eos_token_id=1, pad_token_id=0,
        ).numpy()[:, 1:]  # fmt: skip
    got = np.asarray(
        decode.translate(model, sources, mask, max_new_tokens=new, start_id=0, eos_id=1)
    )
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
    assert (got[:, expected.shape[1] :] == 0).all()
