"""Optimizers and learning-rate schedules, built from optax pieces."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_schedule(opt_cfg: Any, total_steps: int, d_model: int) -> optax.Schedule:
    """The learning rate at each step (counted from 0) for the configured schedule.

    ``rsqrt`` is Vaswani et al.'s lr = scale * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)
    with t = step + 1; it ignores ``optimizer.lr``. The others warm up linearly from 0 to
    ``lr`` over ``warmup_steps`` and then hold (constant), decay linearly or along a cosine
    to ``min_lr_ratio * lr`` at step ``total_steps`` (one past the last update), or (WSD)
    hold and decay linearly over the last ``decay_fraction`` of the run.
    """
    lr, warmup = opt_cfg.lr, opt_cfg.warmup_steps
    floor = opt_cfg.min_lr_ratio * lr
    if opt_cfg.schedule == "rsqrt":
        scale = opt_cfg.rsqrt_scale * d_model**-0.5
        w = max(warmup, 1)

        def rsqrt(step: jax.Array) -> jax.Array:
            t = jnp.asarray(step, jnp.float32) + 1.0
            return scale * jnp.minimum(t**-0.5, t * w**-1.5)

        return rsqrt
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    decay_steps = max(total_steps - warmup, 1)
    if opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, floor, decay_steps)
    elif opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_cfg.min_lr_ratio)
    elif opt_cfg.schedule == "wsd":
        decay = max(int(round(opt_cfg.decay_fraction * total_steps)), 1)
        stable = max(total_steps - warmup - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, floor, decay)], [stable]
        )
    else:
        raise ValueError(f"unknown schedule {opt_cfg.schedule!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([warm, after], [warmup])


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings), not on norm scales or biases."""

    def is_matrix(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return any(n in ("kernel", "embed", "pos_embed") for n in names)

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(opt_cfg: Any, total_steps: int, d_model: int) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW or Adafactor on the schedule."""
    schedule = make_schedule(opt_cfg, total_steps, d_model)
    if opt_cfg.name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            mask=_decay_mask,
        )
    elif opt_cfg.name == "adafactor":
        # optax.adafactor's own weight decay is added after the learning rate, so it would
        # shrink weights by ``weight_decay`` every step; put it before the learning rate
        # instead, decoupled and lr-scaled as in AdamW.
        parts = [
            optax.scale_by_factored_rms(),
            optax.clip_by_block_rms(1.0),
        ]
        if opt_cfg.b1 > 0:
            parts.append(optax.ema(opt_cfg.b1, debias=False))
        if opt_cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=_decay_mask))
        parts.append(optax.scale_by_learning_rate(schedule))
        tx = optax.chain(*parts)
    else:
        raise ValueError(f"unknown optimizer {opt_cfg.name!r}")
    if opt_cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), tx)
    return tx
