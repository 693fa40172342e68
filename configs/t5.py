"""T5 1.0 (Raffel et al., 2020) at three sizes; pick one with the config argument.

    jaxformer train --config=configs/t5.py:small      # or base, large
    python tools/count_params.py --config=configs/t5.py:base

(configs/t5_small.py, t5_base.py, t5_large.py name the same presets.)

| size | layers (enc + dec) x d_model x heads | d_ff | parameters (= HF T5 with LM head) |
|---|---|---|---|
| small | 6 + 6 x 512 x 8 | 2048 | 60,506,624 |
| base | 12 + 12 x 768 x 12 | 3072 | 222,903,552 |
| large | 24 + 24 x 1024 x 16 | 4096 | 737,668,096 |

Architecture as T5 1.0: d_kv 64, vocabulary 32128 (SentencePiece, padded), no absolute
positions, relative position bias (32 buckets, max distance 128, one table per stack),
pre-norm scale-only RMSNorm (eps 1e-6), ReLU MLP, no biases, no 1/sqrt(d_k) scaling,
output tied to the embedding with the decoder output scaled by d_model^-0.5. For T5.1.1 set
``model.mlp='geglu'`` and ``model.tie_embeddings=False``. Weights load from and save to
``transformers`` with ``jaxformer.hf.t5``.

Training follows the paper's pre-training: Adafactor, batch 128 x 512 tokens, 2^19 steps,
lr = 1/sqrt(max(t, 10^4)). jaxformer's ``rsqrt`` schedule is
rsqrt_scale * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5) (t = step + 1), so with
warmup 10^4 and rsqrt_scale = sqrt(d_model) it equals 1/sqrt(t) after warmup; during the
warmup it rises linearly as t / 10^6 up to 0.01 where T5 holds a constant 0.01.
Dropout is 0 for pre-training (T5.1.1's choice; the T5 paper used 0.1 throughout), 0.1 for
fine-tuning.

Data: ``jaxformer train`` span-corrupts the plain-text sources (the built-in corpus here;
point ``data.name``/``data.paths`` at a real one) with
``jaxformer.data.make_span_corruption_dataset``: 568-token chunks become 512-token inputs
and at most 114-token targets, as in T5, with sentinels counting down from the last id. The
SentencePiece model named in ``data.spm_model`` is not shipped: train a 32k one with
``tools/train_tokenizer.py`` (T5's own vocabulary has 32100 pieces, padded to 32128).
"""

import math

from jaxformer.config import base_config

# size: (d_model, d_ff, layers per stack, heads)
SIZES = {
    "small": (512, 2048, 6, 8),
    "base": (768, 3072, 12, 12),
    "large": (1024, 4096, 24, 16),
}


def get_config(size: str = "small"):
    if size not in SIZES:
        raise ValueError(f"T5 size {size!r}: choose one of {list(SIZES)}")
    d_model, d_ff, layers, heads = SIZES[size]
    c = base_config()
    m = c.model
    m.family = "t5"
    m.vocab_size = 32128
    m.d_model, m.d_ff, m.num_heads, m.head_dim = d_model, d_ff, heads, 64
    m.num_layers = m.num_encoder_layers = layers
    m.max_len = 512
    m.position = "none"
    m.relative_buckets = 32
    m.relative_max_distance = 128
    m.norm = "rmsnorm"
    m.norm_position = "pre"
    m.norm_eps = 1e-6
    m.mlp = "relu"
    m.use_bias = False
    m.tie_embeddings = True
    m.scale_embeddings = False
    m.scale_attention = False
    m.dropout = 0.0  # 0.1 for fine-tuning
    m.dtype = "bfloat16"
    m.remat = "full" if size == "large" else "none"
    d = c.data
    d.tokenizer = "sentencepiece"
    d.spm_model = "runs/t5_spm32k.model"
    d.source_seq_len = 512  # corrupted inputs (568 raw tokens)
    d.seq_len = 114  # sentinel + span targets
    o = c.optimizer
    o.name = "adafactor"
    o.b1 = 0.0
    o.weight_decay = 0.0
    o.clip_norm = 0.0
    o.schedule = "rsqrt"
    o.warmup_steps = 10_000
    o.rsqrt_scale = math.sqrt(d_model)
    t = c.train
    t.global_batch = 128
    t.steps = 2**19
    t.eval_every = 5000
    t.checkpoint_every = 5000
    t.run_dir = f"runs/t5_{size}"
    return c
