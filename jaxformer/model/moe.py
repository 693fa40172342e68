"""A mixture-of-experts MLP (Switch / GShard / ST-MoE style): only math and logical axes.

Tensor names carry their shape: G groups, S tokens per group, D model width, E experts,
K experts per token (top-k), C capacity (slots per expert per group), F expert width.

Design:

* Groups: each batch row is one group (G = B, S = L), as in Switch and GShard. Routing
  and capacity are decided within a group, so a group never depends on another row:
  the result does not change with how the batch is split over devices or microbatches.
* Gates: softmax over all experts, then top-k. For k > 1 the k gates are renormalised to
  sum to 1 (Mixtral, ST-MoE); for k = 1 the raw probability is kept (Switch), since a
  renormalised gate would always be 1 and give the router no gradient.
* Capacity: ``C = ceil(capacity_factor * S * K / E)`` slots per expert and group, capped
  at S (no expert can receive more: a token's k experts are distinct). Slots are filled
  in priority order: every token's first choice before any second choice, then by
  position in the group (GShard). An assignment that finds its expert full is dropped:
  it contributes 0, so the residual connection carries that token past the layer.
* Steps: ``route`` (router, top-k, slot positions), ``dispatch`` (scatter tokens into
  the [G, E, C, D] expert buffer), ``experts`` (per-expert MLP on that buffer) and
  ``combine`` (gather results back, weighted by the gates). Only index tensors of size
  G x S x K are built, no G x S x E x C one-hot.
* Expert parallelism: only logical names. Groups are laid out like the batch
  (``batch``), so routing, dispatch and combine stay on the device holding the group's
  tokens; the [G, E, C, D] buffers the experts read and write are laid out by expert
  (``dispatch_batch``, ``expert``), where the expert weights are. The rules table maps
  those names onto the mesh (the ``expert`` axis is in ``batch`` but not in
  ``dispatch_batch``), so the partitioner moves each buffer between the two layouts with
  one all-to-all each way: two per layer forward, two backward.
* Auxiliary losses (already multiplied by their config weights):
  ``aux_loss = moe_aux_loss * E * sum_i f_i P_i`` (Switch load balancing), with f_i the
  fraction of the group's top-k assignments (before capacity) that chose expert i
  (so sum_i f_i = 1 for any k) and P_i the group's mean router probability of expert i,
  averaged over groups; its minimum, 1 x weight, is reached by uniform routing.
  ``z_loss = moe_z_loss * mean(logsumexp(router_logits)^2)`` (ST-MoE).
  ``dropped_fraction`` is the share of the G x S x K assignments dropped for capacity.
  Padding tokens are routed like any other token and count in all three.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model.layers import GATED, Dense, mlp_activation, param
from jaxformer.parallel.sharding import constrain

AUX_KEYS = ("aux_loss", "z_loss", "dropped_fraction")


class Routing(NamedTuple):
    """Where each of a group's S x K assignments goes, and with what weight."""

    logits_GxSxE: jax.Array  # float32 router logits
    probs_GxSxE: jax.Array  # softmax over experts
    experts_GxSxK: jax.Array  # chosen experts, best first
    gates_GxSxK: jax.Array  # combine weights (renormalised for k > 1), dropped or not
    position_GxSxK: jax.Array  # slot within the expert, in priority order (may be >= C)
    kept_GxSxK: jax.Array  # position < C: the assignment fits in its expert
    capacity: int  # C


def capacity(tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert for a group of ``tokens``: ceil(factor * tokens * k / E), <= tokens."""
    return max(1, min(tokens, math.ceil(factor * tokens * top_k / num_experts)))


def _top_k(probs_GxSxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k`` over experts as k argmax passes (the same ties: lowest index first).

    The SPMD partitioner cannot split XLA's TopK by rows: it all-gathers the router
    probabilities of every group and routes them all on every device. Argmax and
    elementwise ops keep each device on its own groups.
    """
    values, indices = [], []
    remaining_GxSxE = probs_GxSxE
    for _ in range(k):
        best_GxS = jnp.argmax(remaining_GxSxE, axis=-1)
        onehot_GxSxE = jax.nn.one_hot(best_GxS, probs_GxSxE.shape[-1], dtype=jnp.bool_)
        values.append(jnp.where(onehot_GxSxE, probs_GxSxE, 0.0).sum(-1))
        indices.append(best_GxS.astype(jnp.int32))
        remaining_GxSxE = jnp.where(onehot_GxSxE, -jnp.inf, remaining_GxSxE)
    return jnp.stack(values, -1), jnp.stack(indices, -1)


class ExpertDense(nnx.Module):
    """E independent dense layers with stacked weights [E, in, out], applied per expert."""

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_out: int,
        axes: tuple[str, str, str],
        *,
        use_bias: bool,
        init_std: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(init_std)
        self.kernel = param(rngs, init, (num_experts, d_in, d_out), axes, param_dtype)
        self.bias = (
            param(
                rngs, nnx.initializers.zeros, (num_experts, d_out), (axes[0], axes[2]), param_dtype
            )
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x_GxExCxI: jax.Array) -> jax.Array:
        kernel_ExIxO = self.kernel[...].astype(self.dtype)
        y_GxExCxO = jnp.einsum("geci,eio->geco", x_GxExCxI.astype(self.dtype), kernel_ExIxO)
        if self.bias is not None:
            y_GxExCxO = y_GxExCxO + self.bias[...].astype(self.dtype)[None, :, None, :]
        return y_GxExCxO


class MoEMLP(nnx.Module):
    """Top-k routed experts in place of the dense MLP; returns (output, aux values)."""

    def __init__(self, cfg: Any, rngs: nnx.Rngs):
        if not 1 <= cfg.moe_top_k <= cfg.moe_experts:
            raise ValueError(
                f"model.moe_top_k={cfg.moe_top_k} must be in [1, moe_experts={cfg.moe_experts}]"
            )
        e, d, f = cfg.moe_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
        self.num_experts, self.top_k, self.kind = e, cfg.moe_top_k, cfg.mlp
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_weight, self.z_weight = cfg.moe_aux_loss, cfg.moe_z_loss
        self.dtype = cfg.dtype
        # The router stays in float32: top-k choices are sensitive to small logit changes.
        # Its expert dimension is not split over the experts' devices: every device routes
        # its own tokens to all E experts before any exchange.
        self.router = Dense(
            (d,), (e,), ("embed", None), use_bias=False, init_std=cfg.init_std,
            dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip
        common = dict(
            use_bias=cfg.use_bias,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.up = ExpertDense(e, d, f, ("expert", "embed", "mlp"), **common)
        self.gate = (
            ExpertDense(e, d, f, ("expert", "embed", "mlp"), **common) if cfg.mlp in GATED else None
        )
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.down = ExpertDense(
            e, f, d, ("expert", "mlp", "embed"), **{**common, "init_std": out_std}
        )

    def route(self, x_GxSxD: jax.Array) -> Routing:
        """Router probabilities, top-k experts and gates, and each assignment's slot."""
        g, s, _ = x_GxSxD.shape
        e, k = self.num_experts, self.top_k
        logits_GxSxE = self.router(x_GxSxD.astype(jnp.float32))
        probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
        gates_GxSxK, experts_GxSxK = _top_k(probs_GxSxE, k)
        if k > 1:
            gates_GxSxK = gates_GxSxK / gates_GxSxK.sum(-1, keepdims=True)
        # Priority order: all first choices (by position), then all second choices, ...
        experts_GxKS = experts_GxSxK.swapaxes(1, 2).reshape(g, k * s)
        onehot_GxKSxE = jax.nn.one_hot(experts_GxKS, e, dtype=jnp.int32)
        taken_GxKSxE = jnp.cumsum(onehot_GxKSxE, axis=1) - onehot_GxKSxE  # slots used before
        position_GxKS = (taken_GxKSxE * onehot_GxKSxE).sum(-1)
        position_GxSxK = position_GxKS.reshape(g, k, s).swapaxes(1, 2)
        cap = capacity(s, e, k, self.capacity_factor)
        return Routing(
            logits_GxSxE, probs_GxSxE, experts_GxSxK, gates_GxSxK, position_GxSxK,
            position_GxSxK < cap, cap,
        )  # fmt: skip

    def _slots(self, routing: Routing) -> jax.Array:
        """Flat slot e * C + position of each assignment; E * C (out of range) if dropped."""
        cap = routing.capacity
        slot_GxSxK = routing.experts_GxSxK * cap + routing.position_GxSxK
        return jnp.where(routing.kept_GxSxK, slot_GxSxK, self.num_experts * cap)

    def dispatch(self, x_GxSxD: jax.Array, routing: Routing) -> jax.Array:
        """Scatters each kept assignment's token into its slot: [G, E, C, D], empty slots 0."""
        g, _, d = x_GxSxD.shape
        e, cap = self.num_experts, routing.capacity

        def one_group(x_SxD: jax.Array, slot_SxK: jax.Array) -> jax.Array:
            buffer_ECxD = jnp.zeros((e * cap, d), x_SxD.dtype)
            # Kept slots are distinct, so adding is setting; its gradient is a plain gather.
            return buffer_ECxD.at[slot_SxK].add(x_SxD[:, None, :], mode="drop")

        expert_in_GxECxD = jax.vmap(one_group)(x_GxSxD, self._slots(routing))
        expert_in_GxExCxD = expert_in_GxECxD.reshape(g, e, cap, d)
        # Built where the group's tokens are (groups split over every batch axis); the
        # constraint moves each expert's slots to the devices holding that expert (its
        # groups now split over the batch axes less the expert one): one all-to-all.
        expert_in_GxExCxD = constrain(expert_in_GxExCxD, ("batch", None, None, "act_embed"))
        return constrain(expert_in_GxExCxD, ("dispatch_batch", "expert", None, "act_embed"))

    def experts(self, x_GxExCxD: jax.Array) -> jax.Array:
        """Every expert's MLP on its own slots."""
        gate_GxExCxF = self.gate(x_GxExCxD) if self.gate is not None else None
        h_GxExCxF = mlp_activation(self.kind, self.up(x_GxExCxD), gate_GxExCxF)
        h_GxExCxF = constrain(h_GxExCxF, ("dispatch_batch", "expert", None, "act_mlp"))
        out_GxExCxD = self.down(h_GxExCxF)
        return constrain(out_GxExCxD, ("dispatch_batch", "expert", None, "act_embed"))

    def combine(self, out_GxExCxD: jax.Array, routing: Routing) -> jax.Array:
        """Gathers each token's k expert outputs and sums them weighted by the gates."""
        g, e, cap, d = out_GxExCxD.shape
        # The all-to-all back: every expert's slots of a group return to the group's device.
        out_GxExCxD = constrain(out_GxExCxD, ("batch", None, None, "act_embed"))
        out_GxECxD = out_GxExCxD.reshape(g, e * cap, d)

        def one_group(out_ECxD: jax.Array, slot_SxK: jax.Array) -> jax.Array:
            return out_ECxD.at[slot_SxK].get(mode="fill", fill_value=0)

        y_GxSxKxD = jax.vmap(one_group)(out_GxECxD, self._slots(routing))
        weights_GxSxK = jnp.where(routing.kept_GxSxK, routing.gates_GxSxK, 0.0)
        y_GxSxD = jnp.einsum("gskd,gsk->gsd", y_GxSxKxD, weights_GxSxK.astype(y_GxSxKxD.dtype))
        return y_GxSxD.astype(self.dtype)

    def aux(self, routing: Routing) -> dict[str, jax.Array]:
        """Weighted load-balancing and z losses, and the dropped fraction (module docstring)."""
        e, k = self.num_experts, self.top_k
        chosen_GxSxE = jax.nn.one_hot(routing.experts_GxSxK, e, dtype=jnp.float32).sum(2)
        f_GxE = chosen_GxSxE.mean(1) / k
        p_GxE = routing.probs_GxSxE.mean(1)
        balance = e * (f_GxE * p_GxE).sum(-1).mean()
        log_z_GxS = jax.nn.logsumexp(routing.logits_GxSxE, axis=-1)
        return {
            "aux_loss": self.aux_weight * balance,
            "z_loss": self.z_weight * jnp.square(log_z_GxS).mean(),
            "dropped_fraction": (~routing.kept_GxSxK).astype(jnp.float32).mean(),
        }

    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Rows are the groups. Returns the output [B, L, D] and the aux values."""
        routing = self.route(x_BxLxD)
        expert_in_GxExCxD = self.dispatch(x_BxLxD, routing)
        expert_out_GxExCxD = self.experts(expert_in_GxExCxD)
        y_BxLxD = self.combine(expert_out_GxExCxD, routing)
        return y_BxLxD, self.aux(routing)


def reduce_layers(aux_NxV: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-layer aux values stacked on a leading axis -> the model's: losses are summed
    over layers, the dropped fraction is averaged. An empty dict (dense) stays empty."""
    return {
        name: value.mean(0) if name == "dropped_fraction" else value.sum(0)
        for name, value in aux_NxV.items()
    }
