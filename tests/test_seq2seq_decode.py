"""Encoder-decoder decoding on the KV cache (EncoderDecoder and T5): the cached loop against
the uncached forward, beam search scores, sampling, and the cache's shape.

As in test_decode.py, random models with a wide init (std 0.3) have peaked, varied
next-token distributions, so argmax decoding is far from trivial.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer import decode
from jaxformer.tasks import model_config, task_for

VOCAB = 64
NEW = 8
START, EOS = 1, 2
# Three sources of different lengths, right-padded (as jaxformer's BLEU evaluation pads).
SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]

FAMILY_OVERRIDES = {
    "post-ln-sinusoidal": {"model.family": "encoder_decoder", "model.position": "sinusoidal"},
    "pre-ln-gqa-learned": {
        "model.family": "encoder_decoder",
        "model.position": "learned",
        "model.norm_position": "pre",
        "model.num_kv_heads": 2,
    },
    "t5-tied": {
        "model.family": "t5",
        "model.position": "none",
        "model.norm": "rmsnorm",
        "model.norm_position": "pre",
        "model.scale_attention": False,
        "model.relative_buckets": 8,
        "model.relative_max_distance": 16,
    },
    "t5.1.1-geglu": {
        "model.family": "t5",
        "model.position": "none",
        "model.norm": "rmsnorm",
        "model.norm_position": "pre",
        "model.scale_attention": False,
        "model.relative_buckets": 8,
        "model.relative_max_distance": 16,
        "model.mlp": "geglu",
        "model.tie_embeddings": False,
    },
}
_MODELS: dict[str, Any] = {}


def _model(make_config: Any, name: str) -> Any:
    if name not in _MODELS:
        cfg = make_config(
            {
                "model.vocab_size": VOCAB,
                "model.init_std": 0.3,
                "model.num_encoder_layers": 3,
                **FAMILY_OVERRIDES[name],
            }
        )
        model_cfg = model_config(cfg.model)
        _MODELS[name] = task_for(cfg).model_class(model_cfg, nnx.Rngs(params=0))
    return _MODELS[name]


def _sources() -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, SOURCES))
    tokens = np.zeros((len(SOURCES), width), np.int32)
    for row, seq in enumerate(SOURCES):
        tokens[row, : len(seq)] = seq
    return tokens, tokens > 0


def _start() -> np.ndarray:
    return np.full((len(SOURCES), 1), START, np.int32)


def _greedy(model: Any, eos_id: int | None = None) -> decode.Generation:
    return decode.generate(model, _start(), max_new_tokens=NEW, eos_id=eos_id, sources=_sources())


@pytest.mark.parametrize("name", FAMILY_OVERRIDES)
def test_cached_greedy_equals_uncached_argmax(make_config, name):
    model = _model(make_config, name)
    cached = np.asarray(_greedy(model).tokens_BxN)
    expected = decode.greedy_reference(model, _start(), max_new_tokens=NEW, sources=_sources())
    np.testing.assert_array_equal(cached, expected)
    # Not trivial: the rows differ, so the decoder reads its source.
    assert len({tuple(row) for row in expected}) == len(SOURCES), expected
    via_translate = decode.translate(
        model, *_sources(), max_new_tokens=NEW, start_id=START, eos_id=None
    )
    np.testing.assert_array_equal(np.asarray(via_translate), cached)


def test_source_padding_changes_nothing(make_config):
    """A source decodes the same alone as in a batch padded to a longer source."""
    model = _model(make_config, "t5-tied")
    batched = np.asarray(_greedy(model).tokens_BxN)
    alone = decode.translate(
        model, np.asarray([SOURCES[1]], np.int32), max_new_tokens=NEW, start_id=START,
        eos_id=None,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(alone)[0], batched[1])


def test_eos_ends_rows(make_config):
    model = _model(make_config, "post-ln-sinusoidal")
    free = np.asarray(_greedy(model).tokens_BxN)
    eos = int(free[0, 2])
    out = _greedy(model, eos_id=eos)
    tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    assert lengths[0] == 3 and (tokens[0, 3:] == 0).all()
    reference = decode.greedy_reference(
        model, _start(), max_new_tokens=NEW, eos_id=eos, sources=_sources()
    )
    np.testing.assert_array_equal(tokens, reference)


@pytest.mark.parametrize("name", ["post-ln-sinusoidal", "t5-tied"])
def test_beam_search(make_config, name):
    """Beam 1 is greedy; every hypothesis' log P equals a teacher-forced forward's; the
    best beam scores at least as well as greedy."""
    model = _model(make_config, name)
    common = dict(max_new_tokens=NEW, eos_id=EOS, sources=_sources(), length_penalty_alpha=0.6)
    one = decode.beam_search(model, _start(), beam_size=1, **common)
    greedy = _greedy(model, EOS)
    np.testing.assert_array_equal(np.asarray(one.best_tokens_BxN), np.asarray(greedy.tokens_BxN))
    beam = decode.beam_search(model, _start(), beam_size=4, **common)
    for j in range(4):
        log_probs = decode.sequence_log_probs(
            model, _start(), None, beam.tokens_BxKxN[:, j], beam.lengths_BxK[:, j],
            sources=_sources(),
        )  # fmt: skip
        np.testing.assert_allclose(beam.log_probs_BxK[:, j], log_probs, atol=1e-4)
    greedy_lp = decode.sequence_log_probs(
        model, _start(), None, greedy.tokens_BxN, greedy.lengths_B, sources=_sources()
    )
    greedy_score = greedy_lp / decode.length_penalty(greedy.lengths_B, 0.6)
    assert (np.asarray(beam.best_scores_B) >= np.asarray(greedy_score) - 1e-5).all()
    best = decode.translate(
        model, *_sources(), max_new_tokens=NEW, start_id=START, eos_id=EOS, beam_size=4,
        length_penalty_alpha=0.6,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(best), np.asarray(beam.best_tokens_BxN))


def test_sampling(make_config):
    """Top-k 1 is greedy; a seeded sample repeats; another seed differs."""
    model = _model(make_config, "t5.1.1-geglu")

    def sample(seed: int, **kwargs: Any) -> np.ndarray:
        out = decode.generate(
            model, _start(), max_new_tokens=NEW, eos_id=None, sources=_sources(),
            temperature=1.0, rng=jax.random.key(seed), **kwargs,
        )  # fmt: skip
        return np.asarray(out.tokens_BxN)

    np.testing.assert_array_equal(sample(0, top_k=1), np.asarray(_greedy(model).tokens_BxN))
    np.testing.assert_array_equal(sample(1), sample(1))
    assert (sample(1) != sample(2)).any()


def test_cache_holds_the_encoder_output_once(make_config):
    """The cross-attention keys/values are computed at init_cache, one per decoder layer."""
    model = _model(make_config, "pre-ln-gqa-learned")
    tokens, mask = _sources()
    cache = model.init_cache(3, NEW, encoder_inputs_BxS=tokens, encoder_mask_BxS=mask)
    cfg = model.cfg
    shape = (cfg.num_layers, 3, tokens.shape[1], cfg.num_kv_heads, cfg.head_dim)
    assert cache["memory_k"].shape == cache["memory_v"].shape == shape
    np.testing.assert_array_equal(cache["encoder_segment_ids"], mask.astype(np.int32))
    memory = model.encode(tokens, mask.astype(np.int32), np.cumsum(mask, 1) - 1)
    last = jax.tree.map(lambda x: x[-1], nnx.state(model.decoder))
    block = nnx.merge(nnx.graphdef(model.decoder), last)
    k, v = block.cross.memory_kv(memory)
    # Real source slots only: what padding slots hold is never attended to.
    np.testing.assert_allclose(cache["memory_k"][-1][mask], k[mask], atol=1e-5)
    np.testing.assert_allclose(cache["memory_v"][-1][mask], v[mask], atol=1e-5)
