"""BERT masking and T5 span corruption: the statistics the papers state, and exactness."""

from __future__ import annotations

import grain
import numpy as np

from jaxformer.data.objectives import (
    BertMask,
    SpanCorrupt,
    bert_mask,
    random_spans_noise_mask,
    span_corrupt,
)

VOCAB, MASK, SPECIAL = 1000, 4, (0, 1, 2, 3, 4)


def test_bert_masking_statistics_on_a_large_sample() -> None:
    rng = np.random.default_rng(0)
    chosen = masked = randomised = unchanged = eligible = 0
    for _ in range(2000):
        tokens = rng.integers(5, VOCAB, 128)
        tokens[0], tokens[-1] = 1, 2  # [CLS] ... [SEP] are never chosen
        out = bert_mask(tokens, rng, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
        picked = out["weights"] > 0
        assert not picked[0] and not picked[-1]
        np.testing.assert_array_equal(out["targets"], tokens)
        np.testing.assert_array_equal(out["inputs"][~picked], tokens[~picked])
        eligible += 126
        chosen += picked.sum()
        masked += (out["inputs"][picked] == MASK).sum()
        same = out["inputs"][picked] == tokens[picked]
        unchanged += same.sum()
        randomised += (~same & (out["inputs"][picked] != MASK)).sum()
        assert not np.isin(out["inputs"][picked][~same], (0, 1, 2, 3)).any()
    assert abs(chosen / eligible - 0.15) < 0.002
    # A random replacement can draw the original token (1 in 995): it then counts as unchanged.
    assert abs(masked / chosen - 0.8) < 0.01
    assert abs(randomised / chosen - 0.1) < 0.01
    assert abs(unchanged / chosen - 0.1) < 0.01


def test_bert_mask_is_redrawn_each_epoch_and_reproducible() -> None:
    tokens = [{"tokens": np.arange(5, 69)} for _ in range(4)]
    kwargs = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)

    def epochs(seed: int) -> list[np.ndarray]:
        ds = grain.MapDataset.source(tokens).repeat(2).random_map(BertMask(**kwargs), seed=seed)
        return [ds[i]["weights"] for i in range(len(ds))]

    first, again = epochs(7), epochs(7)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[4])  # same document, next epoch: new positions


def test_noise_mask_density_and_mean_span_length() -> None:
    rng = np.random.default_rng(1)
    noise = spans = total = 0
    for _ in range(2000):
        mask = random_spans_noise_mask(512, 0.15, 3.0, rng)
        assert not mask[0]  # starts with a non-noise span, as T5's does
        noise += mask.sum()
        spans += (mask & ~np.concatenate([[False], mask[:-1]])).sum()
        total += mask.size
    assert abs(noise / total - 0.15) < 0.002
    assert abs(noise / spans - 3.0) < 0.05


def test_span_corruption_round_trips() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        tokens = rng.integers(5, 900, int(rng.integers(20, 200)))
        out = span_corrupt(tokens, rng, first_sentinel_id=999, eos_id=2)
        inputs, targets = out["inputs"], out["targets"]
        assert targets[-1] == 2
        sentinels = inputs[inputs >= 900]
        np.testing.assert_array_equal(sentinels, 999 - np.arange(len(sentinels)))
        # Putting each span back in place of its sentinel restores the sequence.
        spans = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= 900))[1:]
        restored = []
        for token in inputs:
            if token >= 900:
                span = spans[999 - token]
                assert span[0] == token
                restored.extend(span[1:])
            else:
                restored.append(token)
        np.testing.assert_array_equal(restored, tokens)


def test_span_corrupt_transform_in_a_pipeline() -> None:
    docs = [{"tokens": np.arange(10, 110)} for _ in range(3)]
    ds = grain.MapDataset.source(docs).random_map(
        SpanCorrupt(first_sentinel_id=999, eos_id=2), seed=3
    )
    out = ds[0]
    assert set(out) == {"tokens", "inputs", "targets"}
    assert len(out["inputs"]) < 100 and out["targets"][-1] == 2
