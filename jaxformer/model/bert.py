"""BERT (Devlin et al., 2018): a post-LN bidirectional encoder with MLM, NSP and
classification heads.

The encoder layers are :class:`jaxformer.model.encoder_decoder.EncoderBlock` (post-LN
when ``cfg.norm_position == "post"``), always stacked on a ``layers`` axis and scanned.
Rows may be packed: attention stays within a segment id, and id 0 is padding.
Jaxformer has no dropout on attention probabilities, so training differs from the
reference in that one place; inference is the same function as Hugging Face's BERT.
Tensor names: B batch, L length, D width, V vocabulary, T token types, C labels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention.masks import attention_mask
from jaxformer.model.config import ModelConfig
from jaxformer.model.encoder_decoder import EncoderBlock, _scan, _stack
from jaxformer.model.layers import Dense, Norm, dropout, param, stack_hidden
from jaxformer.model.products import tied_logits
from jaxformer.parallel.sharding import constrain


class Bert(nnx.Module):
    """Embeddings (word + position + token type, LayerNorm), encoder, and heads.

    Parameter names (``embed``, ``pos_embed``, ``type_embed``, ``encoder``, ``pooler``,
    ``mlm_dense``, ``mlm_norm``, ``mlm_bias``, ``nsp``, ``classifier``) are what
    :mod:`jaxformer.hf.bert` maps to Hugging Face's names.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, num_labels: int = 0):
        self.cfg = cfg
        self.num_labels = num_labels
        d = cfg.d_model
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = param(rngs, init, (cfg.vocab_size, d), ("vocab", "embed"), cfg.param_dtype)
        self.pos_embed = param(
            rngs, init, (cfg.max_len, d), ("positions", "embed"), cfg.param_dtype
        )
        # A table of 2 rows: too small to be worth sharding along the type axis.
        self.type_embed = param(
            rngs, init, (cfg.type_vocab_size, d), (None, "embed"), cfg.param_dtype
        )
        self.embed_norm = Norm(d, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.encoder = _stack(cfg, EncoderBlock, cfg.num_layers, rngs)
        common = dict(
            use_bias=True,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.pooler = Dense((d,), (d,), ("embed", "mlp"), **common)
        self.mlm_dense = Dense((d,), (d,), ("embed", "mlp"), **common)
        self.mlm_norm = Norm(d, cfg.norm, cfg.norm_eps, cfg.dtype, rngs)
        self.mlm_bias = param(
            rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",), jnp.float32
        )
        self.nsp = Dense((d,), (2,), ("embed", None), **common)
        self.classifier = (
            Dense((d,), (num_labels,), ("embed", None), **common) if num_labels > 0 else None
        )

    def _encode(
        self,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        token_type_ids_BxL: jax.Array,
        key: jax.Array | None = None,
        capture: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        keys = jax.random.split(key) if key is not None else (None, None)
        # Gathered copies of the tables: a gather from a sharded table replicates anyway.
        table_VxD = constrain(self.embed[...], (None, None))
        x_BxLxD = jnp.take(table_VxD, inputs_BxL, axis=0).astype(cfg.dtype)
        x_BxLxD += jnp.take(self.pos_embed[...], positions_BxL, axis=0).astype(cfg.dtype)
        x_BxLxD += jnp.take(self.type_embed[...], token_type_ids_BxL, axis=0).astype(cfg.dtype)
        x_BxLxD = dropout(self.embed_norm(x_BxLxD), cfg.dropout, keys[0])
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        mask_BxLxL = attention_mask(segment_ids_BxL, causal=False)
        x_BxLxD, captured = _scan(
            cfg, self.encoder, x_BxLxD, keys[1],
            lambda block, x, k: block(x, mask_BxLxL, positions_BxL, k, None, capture),
        )  # fmt: skip
        return x_BxLxD, stack_hidden(captured, x_BxLxD, "") if capture else {}

    def encode(
        self,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        token_type_ids_BxL: jax.Array,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """The last encoder layer's output (BERT's ``last_hidden_state``)."""
        return self._encode(inputs_BxL, segment_ids_BxL, positions_BxL, token_type_ids_BxL, key)[0]

    def mlm_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """Float32 masked-LM logits: transform (dense, exact GELU, LayerNorm), then the
        tied word table plus an output bias."""
        h_BxLxD = self.mlm_norm(jax.nn.gelu(self.mlm_dense(x_BxLxD), approximate=False))
        table_VxD = self.embed[...].astype(self.cfg.dtype)
        logits_BxLxV = tied_logits(h_BxLxD.astype(self.cfg.dtype), table_VxD)
        logits_BxLxV = logits_BxLxV + self.mlm_bias[...]
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))

    def pool(self, x_BxLxD: jax.Array) -> jax.Array:
        """tanh(dense) of each row's first token ([CLS]), the input of NSP/classifiers."""
        return jnp.tanh(self.pooler(x_BxLxD[:, 0]))

    def __call__(
        self,
        inputs_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        token_type_ids_BxL: jax.Array,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """``mlm_logits`` [B, L, V], ``pooled`` [B, D], ``nsp_logits`` [B, 2] (float32), and
        ``class_logits`` [B, C] when the model has a classifier."""
        keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        x_BxLxD = self.encode(
            inputs_BxL, segment_ids_BxL, positions_BxL, token_type_ids_BxL, keys[0]
        )
        pooled_BxD = self.pool(x_BxLxD)
        out = {
            "mlm_logits": self.mlm_logits(x_BxLxD),
            "pooled": pooled_BxD,
            "nsp_logits": self.nsp(pooled_BxD).astype(jnp.float32),
        }
        if self.classifier is not None:
            # Hugging Face applies dropout to the pooled output before its classifier.
            pooled_BxD = dropout(pooled_BxD, self.cfg.dropout, keys[1])
            out["class_logits"] = self.classifier(pooled_BxD).astype(jnp.float32)
        return out

    def apply_batch(
        self,
        batch: dict[str, jax.Array],
        dropout_key: jax.Array | None = None,
        *,
        capture: bool = False,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Logits aligned with ``batch["targets"]`` and the aux values: the train step's
        entry point.

        A classifier (``num_labels > 0``) returns ``[B, 1, C]`` class logits for ``[B, 1]``
        label targets. Otherwise the masked-LM logits ``[B, L, V]`` (weighted by
        ``batch["weights"]``, 1 at masked positions), plus, when the batch carries
        ``nsp_targets``, the next-sentence logits ``[B, 1, 2]`` as the sentence-level head
        ``aux["heads"]["nsp"]`` that the step adds to the loss. Without NSP the pooler is
        skipped, as RoBERTa-style MLM needs. ``capture`` adds the intermediates of
        :func:`jaxformer.model.capture_intermediates` to the aux values.
        """
        inputs_BxL = batch["inputs"]
        token_type_ids_BxL = batch.get("token_type_ids")
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(inputs_BxL)
        encoder_key, pooled_key = dropout_key, None
        if self.classifier is not None and dropout_key is not None:
            encoder_key, pooled_key = jax.random.split(dropout_key)
        x_BxLxD, aux = self._encode(
            inputs_BxL, batch["segment_ids"], batch["positions"], token_type_ids_BxL,
            encoder_key, capture,
        )  # fmt: skip
        if self.classifier is not None:
            # As __call__ (and Hugging Face): dropout on the pooled output, then the classifier.
            pooled_BxD = dropout(self.pool(x_BxLxD), self.cfg.dropout, pooled_key)
            return self.classifier(pooled_BxD).astype(jnp.float32)[:, None, :], aux
        if "nsp_targets" in batch:
            nsp_Bx2 = self.nsp(self.pool(x_BxLxD)).astype(jnp.float32)
            aux["heads"] = {"nsp": nsp_Bx2[:, None, :]}
        return self.mlm_logits(x_BxLxD), aux
