"""Parameter counts and training FLOPs per token: the one convention behind MFU.

Convention (as in PaLM, Chowdhery et al. 2022, appendix B): count matrix multiplies
only, 2 FLOPs per multiply-add; training costs 3x the forward pass (forward, and a
backward that computes gradients for both activations and weights). Attention scores
(Q K^T and the probabilities times V) are counted over the full L x L square, as PaLM
does, although a causal mask makes half of it unnecessary. Embedding lookups, norms,
softmax and elementwise work are not counted. Rematerialisation is not counted either:
MFU measures useful model FLOPs, not the hardware FLOPs recomputation spends.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Per-token figures for one model at one sequence length."""

    params: int  # every parameter
    embedding_params: int  # token (and learned position) tables
    matmul_params: int  # parameters that multiply activations (includes the output head)
    attention_flops: int  # forward score and value FLOPs per token
    train_flops_per_token: int  # 3 x (2 x matmul_params + attention_flops)

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params

    @property
    def six_n(self) -> int:
        """The 6N approximation (Kaplan et al.) with N the non-embedding parameters."""
        return 6 * self.non_embedding_params


def count(model_cfg: Any, seq_len: int) -> FlopCount:
    """Counts a decoder config (``cfg.model``) analytically, without building it."""
    m = model_cfg
    heads, kv = m.num_heads, m.num_kv_heads or m.num_heads
    dh = m.head_dim or m.d_model // heads
    d, f, v, layers = m.d_model, m.d_ff, m.vocab_size, m.num_layers
    attn = d * heads * dh + 2 * d * kv * dh + heads * dh * d
    mlp = (3 if m.mlp == "swiglu" else 2) * d * f
    bias = 0
    if m.use_bias:
        bias = heads * dh + 2 * kv * dh + d + (2 if m.mlp == "swiglu" else 1) * f + d
    norms = 2 * (2 if m.norm == "layernorm" else 1) * d
    final_norm = (2 if m.norm == "layernorm" else 1) * d if m.norm_position == "pre" else 0
    embedding = v * d + (m.max_len * d if m.position == "learned" else 0)
    head = 0 if m.tie_embeddings else d * v
    params = layers * (attn + mlp + bias + norms) + final_norm + embedding + head
    matmul = layers * (attn + mlp) + d * v
    attention_flops = layers * 2 * 2 * seq_len * heads * dh
    train = 3 * (2 * matmul + attention_flops)
    return FlopCount(params, embedding, matmul, attention_flops, train)
