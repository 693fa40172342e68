"""Parameter counts and training FLOPs per token: the one convention behind MFU.

Convention (as in PaLM, Chowdhery et al. 2022, appendix B): count matrix multiplies
only, 2 FLOPs per multiply-add; training costs 3x the forward pass (forward, and a
backward that computes gradients for both activations and weights). Attention scores
(Q K^T and the probabilities times V) are counted over the full L x L square, as PaLM
does, although a causal mask makes half of it unnecessary. Embedding lookups, norms,
softmax and elementwise work are not counted. Rematerialisation is not counted either:
MFU measures useful model FLOPs, not the hardware FLOPs recomputation spends.

Mixture of experts (``moe_experts > 0``): ``params`` counts every expert and the router
(D x E per layer); ``matmul_params``, and so the FLOPs, count the parameters one token
actually multiplies: its ``moe_top_k`` experts and the router. Capacity padding (empty
slots computed anyway), dropped tokens, and the dispatch and combine gathers are not
counted, for the same reason as rematerialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Per-token figures for one model at one sequence length."""

    params: int  # every parameter
    embedding_params: int  # token (and learned position) tables
    matmul_params: int  # parameters that multiply a token (output head in; MoE: active only)
    attention_flops: int  # forward score and value FLOPs per token
    train_flops_per_token: int  # 3 x (2 x matmul_params + attention_flops)

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params

    @property
    def six_n(self) -> int:
        """The 6N approximation (Kaplan et al.) with N the non-embedding parameters."""
        return 6 * self.non_embedding_params

    def train_flops(self, tokens: int | float) -> float:
        """Compute C of training on ``tokens`` tokens: what scaling sweeps budget and fit."""
        return float(self.train_flops_per_token) * tokens


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Parameter counts of a decoder stack's pieces, which families combine."""

    attn: int  # one attention block's projections
    attn_bias: int
    block: int  # one layer: attention, MLP (every expert), norms, biases
    active_mlp: int  # the MLP parameters one token multiplies (MoE: top-k and router)
    norm: int
    final_norm: int
    embedding: int
    head: int
    attention_flops_per_layer: int


def _parts(m: Any, seq_len: int) -> _Parts:
    heads, kv = m.num_heads, m.num_kv_heads or m.num_heads
    dh = m.head_dim or m.d_model // heads
    d, f, v = m.d_model, m.d_ff, m.vocab_size
    attn = d * heads * dh + 2 * d * kv * dh + heads * dh * d
    experts = getattr(m, "moe_experts", 0)
    f = (m.moe_d_ff or f) if experts else f
    per_mlp = (3 if m.mlp in ("swiglu", "geglu") else 2) * d * f
    per_mlp_bias = (2 if m.mlp in ("swiglu", "geglu") else 1) * f + d
    if experts:
        mlp = experts * per_mlp + d * experts  # all experts and the router
        active_mlp = m.moe_top_k * per_mlp + d * experts
        mlp_bias = experts * per_mlp_bias
    else:
        mlp = active_mlp = per_mlp
        mlp_bias = per_mlp_bias
    attn_bias = heads * dh + 2 * kv * dh + d if m.use_bias else 0
    mlp_bias = mlp_bias if m.use_bias else 0
    norm = (2 if m.norm == "layernorm" else 1) * d
    return _Parts(
        attn=attn,
        attn_bias=attn_bias,
        block=attn + attn_bias + mlp + mlp_bias + 2 * norm,
        active_mlp=active_mlp,
        norm=norm,
        final_norm=norm if m.norm_position == "pre" else 0,
        embedding=v * d + (m.max_len * d if m.position == "learned" else 0),
        head=0 if m.tie_embeddings else d * v,
        attention_flops_per_layer=2 * 2 * seq_len * heads * dh,
    )


def _totals(params: int, embedding: int, matmul: int, attention_flops: int) -> FlopCount:
    return FlopCount(params, embedding, matmul, attention_flops, 3 * (2 * matmul + attention_flops))


def count(model_cfg: Any, seq_len: int) -> FlopCount:
    """Counts a decoder stack (``cfg.model``) analytically, without building it: the
    embedding, ``num_layers`` blocks, the final norm and the output head. A family with
    more parts adds them through its task (``jaxformer.tasks.count_flops``)."""
    m, p = model_cfg, _parts(model_cfg, seq_len)
    layers = m.num_layers
    params = layers * p.block + p.final_norm + p.embedding + p.head
    matmul = layers * (p.attn + p.active_mlp) + m.d_model * m.vocab_size
    return _totals(params, p.embedding, matmul, layers * p.attention_flops_per_layer)


def with_bert_heads(c: FlopCount, m: Any) -> FlopCount:
    """BERT's parts beyond the stack: token types, the embedding LayerNorm, the pooler,
    the NSP classifier and the MLM head (dense, LayerNorm, output bias; its projection is
    tied to the token table), and a sequence classifier (fine-tuning), if any."""
    d, v = m.d_model, m.vocab_size
    types = m.type_vocab_size * d
    labels = getattr(m, "num_labels", 0)
    heads = 2 * d + (d * d + d) + (2 * d + 2) + (d * d + d + 2 * d + v)
    return _totals(
        c.params + types + heads + labels * d + labels,
        c.embedding_params + types,
        c.matmul_params + d * d,  # the MLM head's dense layer, per token
        c.attention_flops,
    )


def with_encoder(c: FlopCount, m: Any, seq_len: int, *, relative_bias: bool) -> FlopCount:
    """An encoder-decoder's parts beyond the decoder stack, per target token with as many
    source tokens as target tokens: the encoder's layers and the decoder's cross-attention
    (another attention block and norm); with ``relative_bias`` (T5) one bias table per
    stack."""
    p, layers = _parts(m, seq_len), m.num_layers
    enc_layers = m.num_encoder_layers or layers
    params = enc_layers * p.block + p.final_norm + layers * (p.attn + p.attn_bias + p.norm)
    if relative_bias:
        params += 2 * m.relative_buckets * m.num_heads
    return _totals(
        c.params + params,
        c.embedding_params,
        c.matmul_params + enc_layers * (p.attn + p.active_mlp) + layers * p.attn,
        c.attention_flops + (enc_layers + layers) * p.attention_flops_per_layer,
    )
