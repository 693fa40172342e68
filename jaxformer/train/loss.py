"""Token-level cross-entropy with label smoothing and z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits_BxLxV: jax.Array,
    targets_BxL: jax.Array,
    weights_BxL: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed (not averaged) loss over weighted tokens, and summed statistics.

    Sums let gradient accumulation and data parallelism divide once, by the total token
    weight of the global batch, so any split of the batch gives the same loss.
    The smoothed target is (1 - eps) * onehot + eps / V; the z-loss term
    ``z_loss * logsumexp(logits)^2`` (PaLM) keeps the softmax normaliser near 1.
    """
    logits = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    # The target's logit as a masked sum over the vocabulary, not a gather: exact (one
    # nonzero term), fused with the logsumexp pass, and partitionable inside the pipeline's
    # shard_map with fsdp x tensor, where XLA (jax 0.10.2) aborts on the gather.
    is_target_BxLxV = jnp.arange(logits.shape[-1]) == targets_BxL[..., None]
    target_logit_BxL = jnp.where(is_target_BxLxV, logits, 0.0).sum(axis=-1)
    nll_BxL = log_z_BxL - target_logit_BxL
    loss_BxL = nll_BxL
    if label_smoothing > 0:
        mean_logit_BxL = logits.mean(axis=-1)
        smooth_BxL = log_z_BxL - mean_logit_BxL  # -mean_v log p_v
        loss_BxL = (1.0 - label_smoothing) * nll_BxL + label_smoothing * smooth_BxL
    if z_loss > 0:
        loss_BxL = loss_BxL + z_loss * jnp.square(log_z_BxL)
    correct_BxL = (jnp.argmax(logits, axis=-1) == targets_BxL).astype(jnp.float32)
    stats = {
        "weight": weights_BxL.sum(),
        "nll": (nll_BxL * weights_BxL).sum(),
        "correct": (correct_BxL * weights_BxL).sum(),
    }
    return (loss_BxL * weights_BxL).sum(), stats
