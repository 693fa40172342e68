"""The bad-step guard: a step with a non-finite loss or gradient norm, or (optionally) a
loss spike, is not applied.

It lives inside the jitted train step, so judging a step costs no host round trip: the
new parameters and optimizer state are selected elementwise against the old ones (XLA
fuses the select into the update), and the counters travel in the train state, so a
resumed run judges exactly as an uninterrupted one. The longest run of skipped steps so
far is kept too, so the loop needs no host round trip per step: it reads that counter when
it fetches metrics anyway (log steps) and before each save, and stops the run once it
reaches ``train.max_bad_steps``.

The spike guard (``train.spike_sigma > 0``) skips a step whose loss exceeds the running
mean by more than ``spike_sigma`` running standard deviations, once ``spike_warmup``
steps have built the statistics. Mean and variance are exponential moving averages
(decay ``SPIKE_DECAY``, about the last 100 steps) of every finite loss, skipped ones
included, so a lasting change of level is learned instead of skipped forever.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

SPIKE_DECAY = 0.99


Guard = dict[str, jax.Array]


def init_guard() -> Guard:
    """Counters and loss statistics at step 0."""
    count = jnp.zeros((), jnp.int32)
    value = jnp.zeros((), jnp.float32)
    return {
        "bad_in_a_row": count,  # skipped steps since the last applied one
        "longest_in_a_row": count,  # the most skipped steps in a row so far
        "nonfinite_total": count,
        "spikes_total": count,
        "loss_count": count,  # finite losses seen by the statistics
        "loss_mean": value,
        "loss_var": value,
    }


def judge(
    train_cfg: Any, guard: Guard, loss: jax.Array, grad_norm: jax.Array
) -> tuple[jax.Array, Guard]:
    """Whether to apply this step, and the guard after it."""
    loss = loss.astype(jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    spike = jnp.zeros((), bool)
    if train_cfg.spike_sigma > 0:
        limit = guard["loss_mean"] + train_cfg.spike_sigma * jnp.sqrt(guard["loss_var"])
        spike = finite & (guard["loss_count"] >= train_cfg.spike_warmup) & (loss > limit)
    ok = finite & ~spike

    first = guard["loss_count"] == 0
    delta = loss - guard["loss_mean"]
    mean = jnp.where(first, loss, guard["loss_mean"] + (1 - SPIKE_DECAY) * delta)
    var = jnp.where(first, 0.0, SPIKE_DECAY * (guard["loss_var"] + (1 - SPIKE_DECAY) * delta**2))
    one = jnp.ones((), jnp.int32)
    in_a_row = jnp.where(ok, 0, guard["bad_in_a_row"] + 1)
    new = {
        "bad_in_a_row": in_a_row,
        "longest_in_a_row": jnp.maximum(guard["longest_in_a_row"], in_a_row),
        "nonfinite_total": guard["nonfinite_total"] + jnp.where(finite, 0, one),
        "spikes_total": guard["spikes_total"] + jnp.where(spike, one, 0),
        "loss_count": guard["loss_count"] + jnp.where(finite, one, 0),
        "loss_mean": jnp.where(finite, mean, guard["loss_mean"]),
        "loss_var": jnp.where(finite, var, guard["loss_var"]),
    }
    return ok, new


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old``, leaf by leaf (NaNs in ``new`` do not leak)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def metrics(ok: jax.Array, guard: Guard) -> dict[str, jax.Array]:
    """What the loop logs and reads: whether the step was skipped, and the counters."""
    return {
        "skipped": 1.0 - ok.astype(jnp.float32),
        "bad_in_a_row": guard["bad_in_a_row"],
        "longest_in_a_row": guard["longest_in_a_row"],
        "nonfinite_total": guard["nonfinite_total"],
        "spikes_total": guard["spikes_total"],
    }
