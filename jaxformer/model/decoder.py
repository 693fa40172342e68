"""A decoder-only Transformer language model (GPT / LLaMA family), parts chosen by config."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention.masks import attention_mask, cache_slots
from jaxformer.model.config import ModelConfig
from jaxformer.model.layers import MLP, Attention, Norm, TokenEmbeddings, dropout, stack_hidden
from jaxformer.model.moe import MoEMLP, reduce_layers
from jaxformer.model.remat import REMAT_POLICIES
from jaxformer.parallel.sharding import constrain


class Block(nnx.Module):
    """Attention then MLP, each with a residual; norms before (pre) or after (post) them."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.mlp = MoEMLP(cfg, rngs) if cfg.moe_experts > 0 else MLP(cfg, rngs)

    def _mlp(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The MLP's output and its aux values ({} for a dense MLP)."""
        if isinstance(self.mlp, MoEMLP):
            return self.mlp(x_BxLxD)
        return self.mlp(x_BxLxD), {}

    def _residuals(
        self, x_BxLxD: jax.Array, attend: Callable, key: jax.Array | None
    ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        """Wraps ``attend`` (normed input -> (output, extra)) and the MLP in residuals;
        returns the new x, ``extra`` and the MLP's aux values."""
        rate = self.cfg.dropout
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        if self.cfg.norm_position == "pre":
            h, extra = attend(self.attn_norm(x_BxLxD))
            x_BxLxD = x_BxLxD + dropout(h, rate, k_attn)
            h, aux = self._mlp(self.mlp_norm(x_BxLxD))
            x_BxLxD = x_BxLxD + dropout(h, rate, k_mlp)
        else:
            h, extra = attend(x_BxLxD)
            x_BxLxD = self.attn_norm(x_BxLxD + dropout(h, rate, k_attn))
            h, aux = self._mlp(x_BxLxD)
            x_BxLxD = self.mlp_norm(x_BxLxD + dropout(h, rate, k_mlp))
        return constrain(x_BxLxD, ("batch", "length", "act_embed")), extra, aux

    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_BxLxS: jax.Array,
        positions_BxL: jax.Array,
        key: jax.Array | None,
        capture: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
        """The block's output, its MLP's aux values ({} for a dense MLP) and, with
        ``capture``, its input and attention probabilities (else {})."""

        def attend(h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
            return self.attn(h, mask_BxLxS, positions_BxL, return_probs=capture)

        out_BxLxD, probs_BxHxLxL, aux = self._residuals(x_BxLxD, attend, key)
        captured = {"hidden": x_BxLxD, "attention": probs_BxHxLxL} if capture else {}
        return out_BxLxD, aux, captured

    def decode(
        self,
        x_BxTxD: jax.Array,
        mask_BxTxS: jax.Array,
        positions_BxT: jax.Array,
        key_positions_BxS: jax.Array,
        kv_cache: dict[str, jax.Array],
        index: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        def attend(h: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
            return self.attn.decode(
                h, mask_BxTxS, positions_BxT, key_positions_BxS, kv_cache, index
            )

        x_BxTxD, kv_cache, _ = self._residuals(x_BxTxD, attend, None)
        return x_BxTxD, kv_cache


class DecoderLM(TokenEmbeddings, nnx.Module):
    """Token (+ position) embedding, a stack of causal blocks, and next-token logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self._init_embeddings(cfg, rngs)
        # The layers are initialised as one stack either way: unrolled layers are its
        # slices, so both layouts start from the same weights for a seed, and the init
        # program holds one random draw per weight, not one per weight and layer (with 22
        # layers unrolled one by one it compiled in 17.5 s instead of 2.9 s on CPU).
        layer_axis = {nnx.PARTITION_NAME: "layers"} if cfg.scan_layers else {}

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=layer_axis)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        blocks = make_blocks(rngs)
        if cfg.scan_layers:
            self.blocks = blocks
        else:
            graphdef, stacked = nnx.split(blocks)
            self.blocks = nnx.List(
                [
                    nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
                    for i in range(cfg.num_layers)
                ]
            )
        self.final_norm = (
            Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
            if cfg.norm_position == "pre"
            else None
        )

    def _run_blocks(
        self,
        x_BxLxD: jax.Array,
        mask_BxLxS: jax.Array,
        positions_BxL: jax.Array,
        key: Any,
        capture: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
        """The stack's output, the MLPs' aux values reduced over layers ({} if dense),
        and the captured values of every layer stacked on a leading axis."""
        cfg = self.cfg
        train = key is not None
        # Without dropout the per-layer keys are placeholders, so scan keeps one signature.
        keys = jax.random.split(key, cfg.num_layers) if train else jnp.zeros(cfg.num_layers)

        def apply(block: Block, x: jax.Array, k: jax.Array) -> tuple[jax.Array, dict, dict]:
            return block(x, mask_BxLxS, positions_BxL, k if train else None, capture)

        if cfg.remat != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[cfg.remat])
        if not cfg.scan_layers:
            per_layer = []
            for i, block in enumerate(self.blocks):
                x_BxLxD, aux, captured = apply(block, x_BxLxD, keys[i])
                per_layer.append((aux, captured))
            aux_per_layer, captured = jax.tree.map(lambda *v: jnp.stack(v), *per_layer)
            return x_BxLxD, reduce_layers(aux_per_layer), captured

        @nnx.scan(
            in_axes=(nnx.Carry, 0, 0),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def scan_fn(x: jax.Array, block: Block, k: jax.Array) -> tuple[jax.Array, tuple]:
            x, aux, captured = apply(block, x, k)
            return x, (aux, captured)

        x_BxLxD, (aux_per_layer, captured) = scan_fn(x_BxLxD, self.blocks, keys)
        return x_BxLxD, reduce_layers(aux_per_layer), captured

    def _final(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.final_norm(x_BxLxD) if self.final_norm is not None else x_BxLxD

    # -- the pipeline-stage interface (jaxformer.parallel.pipeline_parallel.StageModel) --

    def embed_tokens(self, inputs_BxL: jax.Array, positions_BxL: jax.Array, key: Any) -> jax.Array:
        """Token (+ position) embedding, with dropout when ``key`` is given."""
        return self._embed(inputs_BxL, positions_BxL, key)

    def stage_layers(
        self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, key: Any
    ) -> jax.Array:
        """Every layer of this model under the dense causal mask (a pipeline stage's model
        holds its share of the layers); the MoE aux values are not returned."""
        mask_BxLxS = attention_mask(
            segment_ids_BxL, causal=True, positions_BxL=positions_BxL,
            window=self.cfg.sliding_window,
        )  # fmt: skip
        y_BxLxD, _, _ = self._run_blocks(x_BxLxD, mask_BxLxS, positions_BxL, key)
        return y_BxLxD

    def stage_head(self, y_BxLxD: jax.Array) -> jax.Array:
        """The final norm and float32 logits of the last layer's output."""
        return self.output_logits(self._final(y_BxLxD))

    def __call__(
        self,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        dropout_key: jax.Array | None = None,
        *,
        return_aux: bool = False,
        capture: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Returns float32 logits [B, L, V]; ``dropout_key=None`` runs deterministically.
        ``return_hidden`` returns the final hidden states [B, L, D] instead, for a loss
        that projects them itself (``train.loss_chunk``, via ``output_logits``).

        With ``return_aux``, returns (logits, aux): the MoE auxiliary values summed over
        layers (``aux_loss``, ``z_loss``, already weighted, to add to the training loss)
        and the mean ``dropped_fraction``; ``{}`` for a dense model. ``capture`` (implies
        ``return_aux``) adds what :func:`jaxformer.model.capture_intermediates` documents.
        """
        embed_key = block_key = None
        if dropout_key is not None:
            embed_key, block_key = jax.random.split(dropout_key)
        x_BxLxD = self._embed(inputs_BxL, positions_BxL, embed_key)
        mask_BxLxS = self.cfg.attention.self_mask(
            segment_ids_BxL, positions_BxL, causal=True, window=self.cfg.sliding_window
        )
        x_BxLxD, aux, captured = self._run_blocks(
            x_BxLxD, mask_BxLxS, positions_BxL, block_key, capture
        )
        x_BxLxD = self._final(x_BxLxD)
        if capture:
            aux = {**aux, **stack_hidden(captured, x_BxLxD, "")}
        out = x_BxLxD if return_hidden else self.output_logits(x_BxLxD)
        return (out, aux) if return_aux or capture else out

    def apply_batch(
        self,
        batch: dict[str, jax.Array],
        dropout_key: jax.Array | None = None,
        *,
        capture: bool = False,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits aligned with ``batch["targets"]`` (or, with ``return_hidden``, the final
        hidden states) and the aux values (the train step's entry point, shared by every
        model family)."""
        return self(
            batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key,
            return_aux=True, capture=capture, return_hidden=return_hidden,
        )  # fmt: skip

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
        """An empty decoding cache of ``max_len`` slots per row (segment id 0 = empty)."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {
            "k": jnp.zeros(shape, dtype or cfg.dtype),
            "v": jnp.zeros(shape, dtype or cfg.dtype),
            "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
            "positions": jnp.zeros((batch_size, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def decode(
        self,
        inputs_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        cache: dict[str, jax.Array],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits for T new tokens given everything already in ``cache``, and the new cache.

        Prefill a prompt with T = its length, then feed one token at a time. Rows may be
        left-padded with segment id 0, which no token attends to.
        """
        cfg = self.cfg
        index = cache["index"]
        seg_BxS, pos_BxS, mask_BxTxS = cache_slots(
            cache, segment_ids_BxT, positions_BxT, cfg.sliding_window
        )
        x_BxTxD = self._embed(inputs_BxT, positions_BxT, None)

        def step(block: Block, x: jax.Array, k: jax.Array, v: jax.Array) -> tuple:
            x, kv = block.decode(x, mask_BxTxS, positions_BxT, pos_BxS, {"k": k, "v": v}, index)
            return x, (kv["k"], kv["v"])

        if cfg.scan_layers:
            scan = nnx.scan(
                lambda x, block, k, v: step(block, x, k, v),
                in_axes=(nnx.Carry, 0, 0, 0),
                out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            x_BxTxD, (k_cache, v_cache) = scan(x_BxTxD, self.blocks, cache["k"], cache["v"])
        else:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                x_BxTxD, (k, v) = step(block, x_BxTxD, cache["k"][i], cache["v"][i])
                ks.append(k)
                vs.append(v)
            k_cache, v_cache = jnp.stack(ks), jnp.stack(vs)
        new_cache = {
            "k": k_cache,
            "v": v_cache,
            "segment_ids": seg_BxS,
            "positions": pos_BxS,
            "index": index + inputs_BxT.shape[1],
        }
        return self.output_logits(self._final(x_BxTxD)), new_cache


def count_params(state: Any) -> int:
    """Number of parameters in an (abstract or concrete) model state."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
