"""Decoding: the KV-cache loops against uncached references, beam search, sampling, the CLI.

A random model with a wide init (std 0.3) has peaked, varied next-token distributions,
so argmax decoding is far from trivial and near-ties (which float noise could flip) are
rare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CLI
from flax import nnx

from jaxformer import cli, decode
from jaxformer.model import DecoderLM
from jaxformer.tasks import model_config

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64
NEW = 8  # new tokens per row
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 10, 11, 12, 13, 14]]  # different lengths, left-padded
NO_EOS = None

_MODELS: dict[tuple, DecoderLM] = {}


def _model(make_config: Any, **overrides: Any) -> DecoderLM:
    """A random tiny model per distinct config, built once per session."""
    key = tuple(sorted(overrides.items()))
    if key not in _MODELS:
        cfg = make_config({"model.vocab_size": VOCAB, "model.init_std": 0.3, **overrides})
        _MODELS[key] = DecoderLM(model_config(cfg.model), nnx.Rngs(params=0))
    return _MODELS[key]


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    return decode.left_pad(PROMPTS)


def _greedy(model: DecoderLM, eos_id: int | None = NO_EOS) -> decode.Generation:
    prompt, mask = _prompts()
    return decode.generate(model, prompt, mask, max_new_tokens=NEW, eos_id=eos_id)


def _truncate_at(tokens_BxN: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """What a row becomes when ``eos_id`` ends it: kept, then padding; and its length."""
    out = np.array(tokens_BxN)
    lengths = np.full(len(out), out.shape[1])
    for i, row in enumerate(out):
        hits = np.flatnonzero(row == eos_id)
        if hits.size:
            lengths[i] = hits[0] + 1
            row[lengths[i] :] = 0
    return out, lengths


# -- the cached loop against the uncached forward -----------------------------------------

# Each position kind, scanned and unrolled layers, MHA, GQA and MQA, a sliding window.
CONFIGS = {
    "rope-scan": {},
    "rope-loop-gqa-window": {
        "model.scan_layers": False,
        "model.num_kv_heads": 2,
        "model.sliding_window": 5,
    },
    "learned-loop-mqa": {
        "model.position": "learned",
        "model.scan_layers": False,
        "model.num_kv_heads": 1,
    },
    "alibi-scan-gqa": {"model.position": "alibi", "model.num_kv_heads": 2},
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_cached_greedy_equals_uncached_argmax(make_config, overrides):
    model = _model(make_config, **overrides)
    prompt, mask = _prompts()
    cached = _greedy(model)
    expected = decode.greedy_reference(model, prompt, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(cached.tokens_BxN), expected)
    np.testing.assert_array_equal(np.asarray(cached.lengths_B), [NEW] * len(PROMPTS))
    assert not np.asarray(cached.finished_B).any()
    assert len(np.unique(expected)) > 4, "argmax decoding should not be trivial"


def test_padded_batch_matches_a_plain_growing_forward(make_config):
    """No padding, no buffer, no cache: one row alone, its sequence growing by the argmax
    (eagerly, a few steps) gives what the left-padded batch gives, cached or not."""
    model = _model(make_config)
    row, steps = 1, 3  # prompt [1, 9]: 4 slots of left padding in the batch
    seq = list(PROMPTS[row])
    for _ in range(steps):
        n = len(seq)
        positions = jnp.arange(n, dtype=jnp.int32)[None]
        logits = model(jnp.asarray([seq]), jnp.ones((1, n), jnp.int32), positions)
        seq.append(int(jnp.argmax(logits[0, -1])))
    prompt, mask = _prompts()
    new = seq[len(PROMPTS[row]) :]
    reference = decode.greedy_reference(model, prompt, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(reference[row, :steps], new)
    np.testing.assert_array_equal(np.asarray(_greedy(model).tokens_BxN)[row, :steps], new)


# -- eos ----------------------------------------------------------------------------------


def test_eos_stops_a_row_and_pads_after_it(make_config):
    model = _model(make_config)
    free = np.asarray(_greedy(model).tokens_BxN)
    eos = int(free[0, 2])  # row 0 now ends at its third token, others wherever it appears
    expected, lengths = _truncate_at(free, eos)
    out = _greedy(model, eos_id=eos)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), expected)
    np.testing.assert_array_equal(np.asarray(out.lengths_B), lengths)
    np.testing.assert_array_equal(np.asarray(out.finished_B), lengths < NEW)
    assert out.tokens_BxN[0, 2] == eos and (np.asarray(out.tokens_BxN[0, 3:]) == 0).all()
    prompt, mask = _prompts()
    reference = decode.greedy_reference(model, prompt, mask, max_new_tokens=NEW, eos_id=eos)
    np.testing.assert_array_equal(reference, expected)


def test_sampled_rows_pad_after_eos(make_config):
    model = _model(make_config)
    prompt, mask = _prompts()
    out = decode.generate(
        model, prompt, mask, max_new_tokens=NEW, eos_id=3, temperature=2.0,
        rng=jax.random.key(3),
    )  # fmt: skip
    for row, length, finished in zip(*map(np.asarray, out), strict=True):
        assert finished == (row[length - 1] == 3)
        assert (row[length:] == 0).all() and (row[: length - 1] != 3).all()


# -- beam search --------------------------------------------------------------------------


@pytest.mark.parametrize("eos_id, alpha", [(NO_EOS, 0.6), (2, 0.0)])
def test_beam_of_one_is_greedy(make_config, eos_id, alpha):
    model = _model(make_config)
    prompt, mask = _prompts()
    greedy = _greedy(model, eos_id)
    beam = decode.beam_search(
        model, prompt, mask, beam_size=1, max_new_tokens=NEW, eos_id=eos_id,
        length_penalty_alpha=alpha,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(beam.best_tokens_BxN), np.asarray(greedy.tokens_BxN))
    np.testing.assert_array_equal(np.asarray(beam.lengths_BxK[:, 0]), np.asarray(greedy.lengths_B))


def _score(model, tokens_BxN, lengths_B, alpha):
    prompt, mask = _prompts()
    log_probs = decode.sequence_log_probs(model, prompt, mask, tokens_BxN, lengths_B)
    return np.asarray(log_probs), np.asarray(log_probs / decode.length_penalty(lengths_B, alpha))


@pytest.mark.parametrize("eos_id", [NO_EOS, 3], ids=["no-eos", "eos"])
def test_beam_search_scores_and_beats_greedy(make_config, eos_id):
    model = _model(make_config)
    prompt, mask = _prompts()
    alpha, k = 0.6, 4
    beam = decode.beam_search(
        model, prompt, mask, beam_size=k, max_new_tokens=NEW, eos_id=eos_id,
        length_penalty_alpha=alpha,
    )  # fmt: skip
    tokens, scores = np.asarray(beam.tokens_BxKxN), np.asarray(beam.scores_BxK)
    lengths = np.asarray(beam.lengths_BxK)
    assert tokens.shape == (len(PROMPTS), k, NEW)
    assert (np.diff(scores, axis=1) <= 0).all(), "hypotheses come best first"
    # Every hypothesis: log P from a teacher-forced forward, the GNMT-normalised score,
    # eos (if any) only as its last token, padding after it.
    for j in range(k):
        log_probs, normalised = _score(model, tokens[:, j], lengths[:, j], alpha)
        np.testing.assert_allclose(np.asarray(beam.log_probs_BxK[:, j]), log_probs, atol=1e-4)
        np.testing.assert_allclose(scores[:, j], normalised, rtol=1e-5, atol=1e-5)
    for row, length in zip(tokens.reshape(-1, NEW), lengths.reshape(-1), strict=True):
        assert (row[length:] == 0).all()
        if eos_id is not None:
            assert (row[: length - 1] != eos_id).all()
            assert length == NEW or row[length - 1] == eos_id
    if eos_id is not None:
        assert (lengths < NEW).any(), "the eos case should finish some hypotheses early"
    greedy = _greedy(model, eos_id)
    _, greedy_scores = _score(model, greedy.tokens_BxN, greedy.lengths_B, alpha)
    assert (scores[:, 0] >= greedy_scores - 1e-5).all(), (scores[:, 0], greedy_scores)
    assert (scores[:, 0] > greedy_scores + 1e-3).any(), "beam search should find better"


# -- sampling -----------------------------------------------------------------------------


def _sample(model, seed, **kwargs):
    prompt, mask = _prompts()
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs}
    out = decode.generate(
        model, prompt, mask, max_new_tokens=NEW, eos_id=NO_EOS, rng=jax.random.key(seed),
        **settings,
    )  # fmt: skip
    return np.asarray(out.tokens_BxN)


def test_sampling(make_config):
    model = _model(make_config)
    greedy = np.asarray(_greedy(model).tokens_BxN)
    np.testing.assert_array_equal(_sample(model, 0, top_k=1), greedy)
    np.testing.assert_array_equal(_sample(model, 1, top_p=1e-6), greedy)
    np.testing.assert_array_equal(_sample(model, 2, top_k=1, temperature=5.0), greedy)
    first = _sample(model, 7)
    np.testing.assert_array_equal(_sample(model, 7), first)
    assert (_sample(model, 8) != first).any()
    assert (first != greedy).any()
    with pytest.raises(ValueError, match="rng"):
        decode.generate(model, *_prompts(), max_new_tokens=2, eos_id=2, temperature=1.0)


def _keep(logits, top_k=0, top_p=1.0):
    out = decode.filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p)
    return np.isfinite(np.asarray(out))


def test_top_k_filter():
    logits = [[1.0, 3.0, 2.0, 0.0], [0.0, 5.0, 5.0, 5.0]]
    np.testing.assert_array_equal(_keep(logits, 2), [[0, 1, 1, 0], [0, 1, 1, 0]])  # ties: low id
    np.testing.assert_array_equal(_keep(logits, 1), [[0, 1, 0, 0], [0, 1, 0, 0]])
    assert _keep(logits, 0).all() and _keep(logits, 10).all()
    kept = decode.filter_logits(jnp.asarray(logits), 2)
    np.testing.assert_array_equal(np.asarray(kept)[0, 1:3], [3.0, 2.0])  # values unchanged


def test_top_p_filter():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5 (id 1), 0.3 (3), 0.15 (0), 0.05
    logits = np.log(probs)[None]
    np.testing.assert_array_equal(_keep(logits, top_p=0.45), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(_keep(logits, top_p=1e-6), [[0, 1, 0, 0]])  # at least one
    np.testing.assert_array_equal(_keep(logits, top_p=0.55), [[0, 1, 0, 1]])
    np.testing.assert_array_equal(_keep(logits, top_p=0.83), [[1, 1, 0, 1]])
    np.testing.assert_array_equal(_keep(logits, top_p=0.96), [[1, 1, 1, 1]])
    assert _keep(logits, top_p=1.0).all()
    # top-k first, then the nucleus of the renormalised survivors: 0.5/0.95 + 0.3/0.95 >= 0.83
    np.testing.assert_array_equal(_keep(logits, top_k=3, top_p=0.83), [[0, 1, 0, 1]])


def test_sample_logits_draws_only_kept_tokens_in_proportion():
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    logits_BxV = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (20000, 1))
    draws = np.asarray(decode.sample_logits(logits_BxV, jax.random.key(0), 1.0, top_k=2))
    assert set(np.unique(draws)) == {1, 3}
    np.testing.assert_allclose((draws == 1).mean(), 0.5 / 0.8, atol=0.02)
    cold = np.asarray(decode.sample_logits(logits_BxV, jax.random.key(1), 0.5))
    np.testing.assert_allclose((cold == 1).mean(), 0.25 / (probs**2).sum(), atol=0.02)


def test_learned_positions_must_fit(make_config):
    model = _model(make_config, **{"model.position": "learned"})  # max_len 32
    with pytest.raises(ValueError, match="max_len"):
        decode.generate(model, *_prompts(), max_new_tokens=30, eos_id=2)


# -- the command line ---------------------------------------------------------------------

TINY = [
    *TINY_CLI,
    "--config.train.eval_every=0",
    "--config.train.tensorboard=False",
]


def test_generate_command(tmp_path: Path, capsys) -> None:
    from jaxformer.config import load_config
    from jaxformer.train.loop import train

    config = f"--config={ROOT / 'configs/default.py'}"
    run_dir = f"--config.train.run_dir={tmp_path / 'run'}"
    train(load_config(config.split("=", 1)[1], [*TINY, run_dir, "--config.train.steps=2"]))
    capsys.readouterr()
    argv = ["generate", config, *TINY, run_dir, "--prompt=def ", "--max_new_tokens=12"]
    assert cli.main([*argv, "--seed=1"]) == 0
    assert capsys.readouterr().out.strip(), "prints the continuation"
    # Two steps in, the likeliest beam may well be an immediate eos: empty text.
    assert cli.main([*argv, "--beam_size=2"]) == 0


def test_generate_without_checkpoint_names_run_dir(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    argv = ["generate", f"--config={ROOT / 'configs/default.py'}", *TINY]
    assert cli.main([*argv, f"--config.train.run_dir={empty}", "--prompt=x"]) == 2
    assert "train.run_dir" in capsys.readouterr().err
    assert not empty.exists(), "nothing is created for a run that does not exist"
