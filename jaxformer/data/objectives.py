"""Pre-training objectives that rewrite token sequences: BERT masking and T5 span corruption.

Both are grain ``RandomMap`` transforms: grain hands each element a generator seeded from
the pipeline seed, the element's index and the epoch, so the corruption is drawn afresh
every epoch yet reproducible, and resumes exactly with the iterator state.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np


def bert_mask(
    tokens_L: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    rate: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Devlin et al.'s masked-LM corruption of one sequence.

    ``rate`` of the non-special positions (rounded, at least one) are chosen; of those,
    ``mask_fraction`` become ``mask_id``, ``random_fraction`` a random non-special token
    and the rest stay unchanged. Returns ``inputs`` (corrupted), ``targets`` (the original
    tokens) and ``weights`` (1.0 exactly at the chosen positions, where the loss applies).
    """
    tokens_L = np.asarray(tokens_L, np.int32)
    eligible = np.flatnonzero(~np.isin(tokens_L, np.asarray(special_ids)))
    weights_L = np.zeros(tokens_L.shape, np.float32)
    inputs_L = tokens_L.copy()
    if eligible.size:
        count = max(1, int(round(rate * eligible.size)))
        chosen = rng.choice(eligible, size=count, replace=False)
        weights_L[chosen] = 1.0
        action = rng.random(count)
        to_mask = chosen[action < mask_fraction]
        to_random = chosen[(action >= mask_fraction) & (action < mask_fraction + random_fraction)]
        inputs_L[to_mask] = mask_id
        allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids))
        inputs_L[to_random] = rng.choice(allowed, size=to_random.size)
    return {"inputs": inputs_L, "targets": tokens_L, "weights": weights_L}


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Raffel et al.'s noise mask: about ``noise_density * length`` noise tokens in spans of
    mean length ``mean_span_length``, alternating with non-noise spans, starting with
    non-noise. Span lengths are a random partition of each token count."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)

    def partition(total: int) -> np.ndarray:
        """``num_spans`` positive lengths summing to ``total``, uniformly at random."""
        cuts = np.sort(rng.choice(np.arange(1, total), size=num_spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise_lengths, keep_lengths = partition(num_noise), partition(length - num_noise)
    mask = np.zeros(length, bool)
    start = 0
    for keep, noise in zip(keep_lengths, noise_lengths, strict=True):
        start += keep
        mask[start : start + noise] = True
        start += noise
    return mask


def span_corrupt(
    tokens_L: np.ndarray,
    rng: np.random.Generator,
    *,
    first_sentinel_id: int,
    eos_id: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> dict[str, np.ndarray]:
    """T5's span corruption of one sequence.

    Each noise span in ``inputs`` is replaced by one sentinel (``first_sentinel_id``,
    then counting down, as T5's ``<extra_id_0>``, ``<extra_id_1>``...); ``targets`` are
    each sentinel followed by the span it replaced, then ``eos_id``.
    """
    tokens_L = np.asarray(tokens_L, np.int32)
    noise = random_spans_noise_mask(len(tokens_L), noise_density, mean_span_length, rng)
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    sentinels = first_sentinel_id - (np.cumsum(starts) - 1)
    inputs = np.where(starts, sentinels, tokens_L)[~noise | starts]
    span_offsets = (np.cumsum(noise) - 1)[starts]  # where each span begins among noise tokens
    targets = np.insert(tokens_L[noise], span_offsets, sentinels[starts])
    targets = np.append(targets, eos_id)
    return {"inputs": inputs.astype(np.int32), "targets": np.asarray(targets, np.int32)}


class BertMask(grain.transforms.RandomMap):
    """``{"tokens": ...}`` -> BERT masked-LM inputs, targets and weights."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, **bert_mask(element["tokens"], rng, **self.kwargs)}


class SpanCorrupt(grain.transforms.RandomMap):
    """``{"tokens": ...}`` -> T5 span-corrupted inputs and targets."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, **span_corrupt(element["tokens"], rng, **self.kwargs)}
