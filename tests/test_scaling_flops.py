"""The FLOP accountant sweeps budget with, against a count done by hand."""

from __future__ import annotations

from jaxformer import flops


def test_accountant_matches_a_hand_count(make_config) -> None:
    """A 2-layer GQA decoder: d_model 32, 4 query heads and 2 KV heads of width 8, SwiGLU
    d_ff 64, RMSNorm, no biases, RoPE, 128-token vocabulary tied to the output head."""
    m = make_config(
        {
            "model.vocab_size": 128,
            "model.d_model": 32,
            "model.num_layers": 2,
            "model.num_heads": 4,
            "model.num_kv_heads": 2,
            "model.d_ff": 64,
            "model.mlp": "swiglu",
            "model.norm": "rmsnorm",
            "model.use_bias": False,
            "model.position": "rope",
            "model.tie_embeddings": True,
        }
    ).model
    embedding = 128 * 32  # the token table; RoPE has no parameters
    attention = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v (2 heads x 8), o = 3,072
    mlp = 3 * 32 * 64  # gate, up, down = 6,144
    norms = 2 * 32  # before attention and before the MLP
    layer = attention + mlp + norms  # 9,280
    params = embedding + 2 * layer + 32  # and the final norm: 22,688
    assert params == 22_688

    counted = flops.count(m, seq_len=16)
    assert counted.params == params
    assert counted.embedding_params == embedding
    assert counted.non_embedding_params == params - embedding == 18_592
    assert counted.six_n == 6 * counted.non_embedding_params == 111_552

    # Forward FLOPs per token: 2 per multiply-add of every matrix a token passes through
    # (the tied output head included), plus Q K^T and probabilities x V over the full
    # 16 x 16 square: 2 layers x 2 products x 2 FLOPs x 16 keys x 4 heads x 8 wide.
    matmul = 2 * (attention + mlp) + 32 * 128  # 22,528
    scores = 2 * 2 * 2 * 16 * 4 * 8  # 4,096
    assert counted.matmul_params == matmul
    assert counted.attention_flops == scores
    assert counted.train_flops_per_token == 3 * (2 * matmul + scores) == 147_456
    assert counted.train_flops(1_000) == 147_456_000.0
