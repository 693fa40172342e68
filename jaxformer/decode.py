"""Text generation with the KV cache: greedy, sampled (temperature, top-k, top-p) and beam search.

Every decoder here is one ``jax.jit`` program: a prefill of the whole prompt, then a
``lax.while_loop`` that feeds one token per step into a cache of fixed size (prompt plus
new tokens), so nothing is recompiled or reallocated per token and the loop can stop
early once every row has ended.

Prompts are batches of token ids ``prompt_BxP`` with a mask ``prompt_mask_BxP`` (True for
real tokens), normally left-padded (:func:`left_pad`). Masked slots get segment id 0, which
no token attends to, and positions count from 0 at each row's first real token, so a
padded row decodes exactly as it would alone. Every row needs at least one real token
(the tokenizer's bos).

Shapes: B batch, P prompt length, N new tokens, V vocabulary, K beams, S cache slots.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.attention.masks import segments_and_positions as _segments_and_positions
from jaxformer.data.tokenizers import PAD_ID

Cache = dict[str, jax.Array]
NEG_INF = -jnp.inf


class Generation(NamedTuple):
    """What :func:`generate` returns."""

    tokens_BxN: jax.Array  # new tokens; pad_id after a row's eos
    lengths_B: jax.Array  # new tokens per row, eos included
    finished_B: jax.Array  # True where the row ended with eos


class BeamResult(NamedTuple):
    """What :func:`beam_search` returns: the K best hypotheses per row, best first (a
    score of -inf marks an empty slot, possible only when K is close to the vocabulary)."""

    tokens_BxKxN: jax.Array  # new tokens; pad_id after a hypothesis' eos
    scores_BxK: jax.Array  # log P(Y) / length_penalty(|Y|)
    log_probs_BxK: jax.Array  # log P(Y), Y = the new tokens with eos
    lengths_BxK: jax.Array  # |Y|: new tokens, eos included

    @property
    def best_tokens_BxN(self) -> jax.Array:
        return self.tokens_BxKxN[:, 0]

    @property
    def best_scores_B(self) -> jax.Array:
        return self.scores_BxK[:, 0]


# -- prompts ------------------------------------------------------------------------------


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Any, Any]:
    """Token lists -> (``prompt_BxP`` int32, ``prompt_mask_BxP`` bool), right-aligned so
    every row's last prompt token sits in the last slot."""
    if not sequences or min(len(s) for s in sequences) == 0:
        raise ValueError("every prompt needs at least one token (the tokenizer's bos)")
    width = max(len(s) for s in sequences)
    prompt_BxP = np.full((len(sequences), width), pad_id, np.int32)
    mask_BxP = np.zeros((len(sequences), width), bool)
    for row, seq in enumerate(sequences):
        prompt_BxP[row, width - len(seq) :] = seq
        mask_BxP[row, width - len(seq) :] = True
    return prompt_BxP, mask_BxP


def _last_real_slot(mask_BxL: jax.Array) -> jax.Array:
    """Index of each row's last real token (the one whose logits predict what follows)."""
    length = mask_BxL.shape[1]
    return (length - 1 - jnp.argmax(mask_BxL[:, ::-1], axis=1)).astype(jnp.int32)


def check_fits(model: Any, prompt_len: int, max_new_tokens: int) -> None:
    """Raises ValueError if the positions would run off a learned position table (a
    gather past its end silently yields NaNs); other position kinds have no hard end."""
    cfg = model.cfg
    if cfg.position == "learned" and prompt_len + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the learned "
            f"position table (model.max_len = {cfg.max_len})"
        )


def _prepare(
    model: Any, prompt_BxP: Any, prompt_mask_BxP: Any, max_new_tokens: int
) -> tuple[jax.Array, jax.Array]:
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    if prompt_BxP.ndim != 2:
        raise ValueError(f"prompt must be [batch, length], got shape {prompt_BxP.shape}")
    if prompt_mask_BxP is None:
        prompt_mask_BxP = jnp.ones(prompt_BxP.shape, bool)
    prompt_mask_BxP = jnp.asarray(prompt_mask_BxP, bool)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_fits(model, prompt_BxP.shape[1], max_new_tokens)
    return prompt_BxP, prompt_mask_BxP


def _sources(sources: tuple[Any, Any] | None) -> tuple[jax.Array, jax.Array] | None:
    if sources is None:
        return None
    tokens_BxS, mask_BxS = sources
    tokens_BxS = jnp.asarray(tokens_BxS, jnp.int32)
    mask_BxS = jnp.ones(tokens_BxS.shape, bool) if mask_BxS is None else jnp.asarray(mask_BxS, bool)
    return tokens_BxS, mask_BxS


# -- the cached model ---------------------------------------------------------------------


def _prefill(
    model: Any, prompt_BxP: jax.Array, mask_BxP: jax.Array, cache_len: int, sources: Any
) -> tuple[jax.Array, Cache, jax.Array]:
    """Runs the prompt through a fresh cache of ``cache_len`` slots; for an
    encoder-decoder, ``sources`` (tokens, mask) are encoded into the cache first.

    Returns the logits that predict the first new token, the cache and the prompt lengths.
    """
    segment_ids_BxP, positions_BxP = _segments_and_positions(mask_BxP)
    encoder = (
        {}
        if sources is None
        else dict(zip(("encoder_inputs_BxS", "encoder_mask_BxS"), sources, strict=True))
    )
    cache = model.init_cache(prompt_BxP.shape[0], cache_len, **encoder)
    logits_BxPxV, cache = model.decode(prompt_BxP, segment_ids_BxP, positions_BxP, cache)
    last_B = _last_real_slot(mask_BxP)
    logits_BxV = jnp.take_along_axis(logits_BxPxV, last_B[:, None, None], axis=1)[:, 0]
    return logits_BxV, cache, mask_BxP.sum(axis=1).astype(jnp.int32)


def _decode_one(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    token_B: jax.Array,
    position_B: jax.Array,
    cache: Cache,
) -> tuple[jax.Array, Cache]:
    """One cached token per row. Loops carry ``state`` and merge the model in their body:
    NNX transforms inside ``decode`` refuse variables traced outside the loop."""
    model = nnx.merge(graphdef, state)
    ones_Bx1 = jnp.ones((token_B.shape[0], 1), jnp.int32)
    logits_Bx1xV, cache = model.decode(token_B[:, None], ones_Bx1, position_B[:, None], cache)
    return logits_Bx1xV[:, 0], cache


# -- sampling -----------------------------------------------------------------------------


def filter_logits(logits_BxV: jax.Array, top_k: Any = 0, top_p: Any = 1.0) -> jax.Array:
    """Sets every token outside the top-k, then outside the top-p nucleus, to -inf.

    ``top_k`` keeps the k largest logits (0: all; ties broken towards the lower id, as
    argmax does). ``top_p`` then keeps the smallest set of the remaining tokens, most
    likely first, whose probability (renormalised over them) reaches p; the most likely
    token always stays. Both may be traced values: one sort serves both filters.
    """
    vocab = logits_BxV.shape[-1]
    order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    rank_V = jnp.arange(vocab)
    keep_sorted_BxV = rank_V < jnp.where(top_k > 0, top_k, vocab)
    probs_BxV = jax.nn.softmax(jnp.where(keep_sorted_BxV, sorted_BxV, NEG_INF), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_sorted_BxV &= (mass_before_BxV < top_p) | (top_p >= 1.0) | (rank_V == 0)
    keep_BxV = jnp.put_along_axis(
        jnp.zeros_like(keep_sorted_BxV), order_BxV, keep_sorted_BxV, axis=-1, inplace=False
    )
    return jnp.where(keep_BxV, logits_BxV, NEG_INF)


def sample_logits(
    logits_BxV: jax.Array, key: jax.Array, temperature: Any, top_k: Any = 0, top_p: Any = 1.0
) -> jax.Array:
    """One token per row from softmax(logits / temperature) restricted by top-k and top-p.

    Temperature comes first, so the nucleus is measured on the tempered distribution.
    """
    scaled_BxV = logits_BxV / temperature
    return jax.random.categorical(key, filter_logits(scaled_BxV, top_k, top_p), axis=-1)


# -- greedy and sampled decoding ----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "pad_id"))
def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_BxP: jax.Array,
    mask_BxP: jax.Array,
    sources: tuple[jax.Array, jax.Array] | None,
    rng: jax.Array | None,
    eos_id: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    pad_id: int,
) -> Generation:
    batch, prompt_len = prompt_BxP.shape
    n = max_new_tokens
    model = nnx.merge(graphdef, state)
    logits_BxV, cache, prompt_lengths_B = _prefill(
        model, prompt_BxP, mask_BxP, prompt_len + n - 1, sources
    )

    def choose(logits_BxV: jax.Array, i: jax.Array) -> jax.Array:
        if greedy:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        key = jax.random.fold_in(rng, i)
        return sample_logits(logits_BxV, key, temperature, top_k, top_p).astype(jnp.int32)

    def emit(i: jax.Array, logits_BxV: jax.Array, carry: tuple) -> tuple:
        tokens_BxN, lengths_B, finished_B = carry
        token_B = jnp.where(finished_B, pad_id, choose(logits_BxV, i))
        tokens_BxN = tokens_BxN.at[:, i].set(token_B)
        lengths_B = lengths_B + (~finished_B).astype(jnp.int32)
        return tokens_BxN, lengths_B, finished_B | (token_B == eos_id)

    init = (
        jnp.full((batch, n), pad_id, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    out = emit(jnp.int32(0), logits_BxV, init)

    def cond(loop: tuple) -> jax.Array:
        i, _, _, (_, _, finished_B) = loop
        return (i < n) & ~jnp.all(finished_B)

    def body(loop: tuple) -> tuple:
        i, state, cache, out = loop
        # Feeds token i-1 (at position prompt length + i - 1) to get the logits of token i.
        token_B, position_B = out[0][:, i - 1], prompt_lengths_B + i - 1
        logits_BxV, cache = _decode_one(graphdef, state, token_B, position_B, cache)
        return i + 1, state, cache, emit(i, logits_BxV, out)

    _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache, out))
    return Generation(*out)


def generate(
    model: Any,
    prompt_BxP: Any,
    prompt_mask_BxP: Any = None,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    pad_id: int = PAD_ID,
    sources: tuple[Any, Any] | None = None,
) -> Generation:
    """Continues each prompt row by up to ``max_new_tokens`` tokens with the KV cache.

    For an encoder-decoder model, ``sources`` is (``tokens_BxS``, ``mask_BxS``): the
    encoder runs once, and the prompt is the decoder's start (see :func:`translate`).

    ``temperature == 0`` is greedy (argmax; ``top_k``/``top_p`` unused); otherwise each
    token is drawn with :func:`sample_logits`, from ``fold_in(rng, step)``, so the same
    rng gives the same sample. A row stops at ``eos_id`` (kept; None: never) and is
    padded with ``pad_id`` after it; the loop ends when every row has. ``temperature``
    must be a Python number (it picks the compiled program); the rest may be traced.
    """
    prompt_BxP, prompt_mask_BxP = _prepare(model, prompt_BxP, prompt_mask_BxP, max_new_tokens)
    greedy = temperature == 0
    if not greedy:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if rng is None:
            raise ValueError("sampling (temperature > 0) needs an rng key")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_BxP,
        prompt_mask_BxP,
        _sources(sources),
        None if greedy else rng,
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        pad_id=pad_id,
    )


# -- beam search --------------------------------------------------------------------------


def length_penalty(length: Any, alpha: Any) -> jax.Array:
    """GNMT (Wu et al. 2016): lp(Y) = ((5 + |Y|) / 6) ** alpha; alpha 0 means none."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _batch_axes(model: Any) -> Any:
    """The batch axis of every cache leaf (None for the scalar index), found by comparing
    the abstract caches of one and two rows, so any cache layout can be re-gathered."""
    one = jax.eval_shape(lambda: model.init_cache(1, 1))
    two = jax.eval_shape(lambda: model.init_cache(2, 1))

    def axis(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct) -> int | None:
        differ = [d for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        return differ[0] if differ else None

    return jax.tree.map(axis, one, two)


def _take_rows(cache: Cache, axes: Any, rows: jax.Array) -> Cache:
    return jax.tree.map(lambda x, a: x if a is None else jnp.take(x, rows, axis=a), cache, axes)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "max_new_tokens", "pad_id"))
def _beam_search(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_BxP: jax.Array,
    mask_BxP: jax.Array,
    sources: tuple[jax.Array, jax.Array] | None,
    eos_id: jax.Array,
    alpha: jax.Array,
    *,
    beam_size: int,
    max_new_tokens: int,
    pad_id: int,
) -> BeamResult:
    batch, prompt_len = prompt_BxP.shape
    k, n = beam_size, max_new_tokens
    model = nnx.merge(graphdef, state)
    axes = _batch_axes(model)
    logits_BxV, cache, prompt_lengths_B = _prefill(
        model, prompt_BxP, mask_BxP, prompt_len + n - 1, sources
    )
    vocab = logits_BxV.shape[-1]
    # Prefill once per row, then copy it to the row's K beams: row b, beam j is b * K + j.
    cache = _take_rows(cache, axes, jnp.repeat(jnp.arange(batch), k))
    positions_BK = jnp.repeat(prompt_lengths_B, k)
    rows_Bx1 = jnp.arange(batch)[:, None]

    def top(values_BxM: jax.Array, *others: jax.Array, count: int) -> tuple:
        """The ``count`` largest values per row, and ``others`` gathered alike."""
        best_BxC, idx_BxC = jax.lax.top_k(values_BxM, count)
        return (best_BxC, *(o[rows_Bx1, idx_BxC] for o in others))

    def select(i: jax.Array, logprobs_BxKxV: jax.Array, s: dict) -> dict:
        """Extends the alive beams by one token; hypotheses that end (eos, or the last
        step) among the top K candidates move to the finished pool, the best K that do
        not end stay alive. 2K candidates always hold K that do not end with eos."""
        candidates_BxKV = (s["alive_lp"][:, :, None] + logprobs_BxKxV).reshape(batch, k * vocab)
        lp_Bx2K, flat_Bx2K = jax.lax.top_k(candidates_BxKV, 2 * k)
        parent_Bx2K, token_Bx2K = flat_Bx2K // vocab, (flat_Bx2K % vocab).astype(jnp.int32)
        seqs_Bx2KxN = s["alive_seqs"][rows_Bx1, parent_Bx2K].at[:, :, i].set(token_Bx2K)
        ends_Bx2K = (token_Bx2K == eos_id) | (i == n - 1)
        accepted_Bx2K = ends_Bx2K & (jnp.arange(2 * k) < k) & (lp_Bx2K > NEG_INF)
        score_Bx2K = jnp.where(accepted_Bx2K, lp_Bx2K / length_penalty(i + 1, alpha), NEG_INF)
        length_Bx2K = jnp.full((batch, 2 * k), i + 1, jnp.int32)
        fin_scores, fin_lp, fin_seqs, fin_len = top(
            jnp.concatenate([s["fin_scores"], score_Bx2K], axis=1),
            jnp.concatenate([s["fin_lp"], jnp.where(accepted_Bx2K, lp_Bx2K, NEG_INF)], axis=1),
            jnp.concatenate([s["fin_seqs"], seqs_Bx2KxN], axis=1),
            jnp.concatenate([s["fin_len"], length_Bx2K], axis=1),
            count=k,
        )
        alive_lp, alive_seqs, parent_BxK = top(
            jnp.where(ends_Bx2K, NEG_INF, lp_Bx2K), seqs_Bx2KxN, parent_Bx2K, count=k
        )
        return {
            "alive_lp": alive_lp,
            "alive_seqs": alive_seqs,
            "parent": parent_BxK,
            "fin_scores": fin_scores,
            "fin_lp": fin_lp,
            "fin_seqs": fin_seqs,
            "fin_len": fin_len,
        }

    def search_over(i: jax.Array, s: dict) -> jax.Array:
        """True when no alive beam can still enter any row's finished top K: log probs
        only fall, so the best alive one scores at most its log prob over the largest
        length penalty still reachable (lp is monotonic in the length)."""
        best_lp = jnp.maximum(length_penalty(i + 1, alpha), length_penalty(n, alpha))
        bound_B = s["alive_lp"][:, 0] / best_lp
        return (i >= n) | jnp.all(s["fin_scores"][:, -1] >= bound_B)

    empty_seqs = jnp.full((batch, k, n), pad_id, jnp.int32)
    init = {
        "alive_lp": jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1)),
        "alive_seqs": empty_seqs,
        "parent": jnp.zeros((batch, k), jnp.int32),
        "fin_scores": jnp.full((batch, k), NEG_INF),
        "fin_lp": jnp.full((batch, k), NEG_INF),
        "fin_seqs": empty_seqs,
        "fin_len": jnp.zeros((batch, k), jnp.int32),
    }
    logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    s = select(jnp.int32(0), jnp.broadcast_to(logprobs_BxV[:, None], (batch, k, vocab)), init)

    def body(loop: tuple) -> tuple:
        i, state, cache, s = loop
        # Each new alive beam continues its parent's cache row; feed its token i-1.
        cache = _take_rows(cache, axes, (rows_Bx1 * k + s["parent"]).reshape(-1))
        token_BK = s["alive_seqs"][:, :, i - 1].reshape(-1)
        logits_BKxV, cache = _decode_one(graphdef, state, token_BK, positions_BK + i - 1, cache)
        logprobs_BxKxV = jax.nn.log_softmax(logits_BKxV, axis=-1).reshape(batch, k, vocab)
        return i + 1, state, cache, select(i, logprobs_BxKxV, s)

    def cond(loop: tuple) -> jax.Array:
        i, _, _, s = loop
        return ~search_over(i, s)

    _, _, _, s = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache, s))
    return BeamResult(s["fin_seqs"], s["fin_scores"], s["fin_lp"], s["fin_len"])


def beam_search(
    model: Any,
    prompt_BxP: Any,
    prompt_mask_BxP: Any = None,
    *,
    beam_size: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty_alpha: float = 0.6,
    pad_id: int = PAD_ID,
    sources: tuple[Any, Any] | None = None,
) -> BeamResult:
    """The ``beam_size`` best continuations per row by log P(Y) / lp(Y) (GNMT penalty).

    As in T5X/Flax: alive and finished beams; a hypothesis ends at its eos (counted in
    |Y|) or after ``max_new_tokens``; the cache holds B * K rows, re-gathered from the
    chosen parents each step. As in standard beam search an eos candidate only finishes
    if it ranks within the top K at its step, so ``beam_size=1`` with alpha 0 is greedy.
    The loop stops once no alive beam can reach any row's finished top K.
    ``sources`` as in :func:`generate`.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    prompt_BxP, prompt_mask_BxP = _prepare(model, prompt_BxP, prompt_mask_BxP, max_new_tokens)
    graphdef, state = nnx.split(model)
    return _beam_search(
        graphdef,
        state,
        prompt_BxP,
        prompt_mask_BxP,
        _sources(sources),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
        jnp.asarray(length_penalty_alpha, jnp.float32),
        beam_size=beam_size,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
    )


# -- encoder-decoder models ----------------------------------------------------------------


def translate(
    model: Any,
    sources_BxS: Any,
    source_mask_BxS: Any = None,
    *,
    max_new_tokens: int,
    start_id: int,
    eos_id: int | None,
    beam_size: int = 1,
    length_penalty_alpha: float = 0.6,
    pad_id: int = PAD_ID,
) -> jax.Array:
    """Target tokens ``[B, max_new_tokens]`` for each source row of an encoder-decoder:
    greedy (``beam_size=1``) or the best beam, on the KV cache. The decoder starts from
    ``start_id`` (jaxformer's data: the tokenizer's bos; Hugging Face T5: pad, 0); rows
    are padded with ``pad_id`` after their eos."""
    sources = (sources_BxS, source_mask_BxS)
    start_Bx1 = np.full((np.shape(sources_BxS)[0], 1), start_id, np.int32)
    common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, sources=sources)
    if beam_size > 1:
        out = beam_search(
            model, start_Bx1, beam_size=beam_size, length_penalty_alpha=length_penalty_alpha,
            **common,
        )  # fmt: skip
        return out.best_tokens_BxN
    return generate(model, start_Bx1, **common).tokens_BxN


# -- uncached references (tests, rescoring) -----------------------------------------------


@nnx.jit
def _forward(model: Any, tokens_BxL: jax.Array, mask_BxL: jax.Array, sources: Any) -> jax.Array:
    segment_ids_BxL, positions_BxL = _segments_and_positions(mask_BxL)
    if sources is None:
        return model(tokens_BxL, segment_ids_BxL, positions_BxL)
    source_BxS, source_mask_BxS = sources
    return model(
        source_BxS, *_segments_and_positions(source_mask_BxS),
        tokens_BxL, segment_ids_BxL, positions_BxL,
    )  # fmt: skip


def _full_sequence(
    prompt_BxP: jax.Array, mask_BxP: jax.Array, tokens_BxN: jax.Array, lengths_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    n = tokens_BxN.shape[1]
    new_mask_BxN = jnp.arange(n)[None] < lengths_B[:, None]
    return (
        jnp.concatenate([prompt_BxP, tokens_BxN.astype(jnp.int32)], axis=1),
        jnp.concatenate([mask_BxP, new_mask_BxN], axis=1),
    )


def greedy_reference(
    model: Any,
    prompt_BxP: Any,
    prompt_mask_BxP: Any = None,
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = PAD_ID,
    sources: tuple[Any, Any] | None = None,
) -> np.ndarray:
    """Greedy decoding without a cache: the training forward over the whole sequence for
    every new token. Slow (a Python loop); it is the ground truth for the cached path.
    ``sources`` as in :func:`generate`.

    The sequence lives in a [B, P + N] buffer whose not-yet-generated slots are padding
    (segment 0), so one compiled forward serves every step.
    """
    prompt_BxP, prompt_mask_BxP = _prepare(model, prompt_BxP, prompt_mask_BxP, max_new_tokens)
    sources = _sources(sources)
    batch, prompt_len = prompt_BxP.shape
    tokens_BxN = np.full((batch, max_new_tokens), pad_id, np.int32)
    lengths_B = np.zeros(batch, np.int32)
    finished_B = np.zeros(batch, bool)
    last_B = np.asarray(_last_real_slot(prompt_mask_BxP))
    for i in range(max_new_tokens):
        seq_BxL, mask_BxL = _full_sequence(prompt_BxP, prompt_mask_BxP, tokens_BxN, lengths_B)
        logits_BxLxV = np.asarray(_forward(model, seq_BxL, mask_BxL, sources))
        slot_B = last_B if i == 0 else np.full(batch, prompt_len + i - 1)
        token_B = logits_BxLxV[np.arange(batch), slot_B].argmax(-1)
        tokens_BxN[:, i] = np.where(finished_B, pad_id, token_B)
        lengths_B += ~finished_B
        if eos_id is not None:
            finished_B |= token_B == eos_id
        if finished_B.all():
            break
    return tokens_BxN


def sequence_log_probs(
    model: Any,
    prompt_BxP: Any,
    prompt_mask_BxP: Any,
    tokens_BxN: Any,
    lengths_B: Any,
    sources: tuple[Any, Any] | None = None,
) -> jax.Array:
    """Teacher-forced log P(first ``lengths_B`` new tokens | prompt) with one uncached
    forward: checks beam scores, and rescores candidates from anywhere. ``sources`` as
    in :func:`generate`."""
    n = jnp.asarray(tokens_BxN).shape[1]
    prompt_BxP, prompt_mask_BxP = _prepare(model, prompt_BxP, prompt_mask_BxP, n)
    tokens_BxN = jnp.asarray(tokens_BxN, jnp.int32)
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    seq_BxL, mask_BxL = _full_sequence(prompt_BxP, prompt_mask_BxP, tokens_BxN, lengths_B)
    logits_BxLxV = _forward(model, seq_BxL, mask_BxL, _sources(sources))
    logprobs_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    # New token j is predicted at the slot before it: the last prompt token for j = 0.
    prompt_len = prompt_BxP.shape[1]
    j_N = jnp.arange(n)
    slot_BxN = jnp.where(
        j_N[None] == 0, _last_real_slot(prompt_mask_BxP)[:, None], prompt_len + j_N[None] - 1
    )
    logprobs_BxNxV = jnp.take_along_axis(logprobs_BxLxV, slot_BxN[:, :, None], axis=1)
    token_lp_BxN = jnp.take_along_axis(logprobs_BxNxV, tokens_BxN[:, :, None], axis=2)[..., 0]
    return jnp.sum(jnp.where(j_N[None] < lengths_B[:, None], token_lp_BxN, 0.0), axis=1)
