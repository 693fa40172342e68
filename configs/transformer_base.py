"""The Transformer base model of Vaswani et al. (2017) on WMT14 English-German.

Post-LN encoder-decoder, 6 + 6 layers, d_model 512, 8 heads, ReLU FFN 2048, sinusoidal
positions, one 37k SentencePiece vocabulary shared by source, target and output
projection (embeddings scaled by sqrt(d_model)), dropout 0.1, label smoothing 0.1, Adam
(0.9, 0.98, 1e-9) on the inverse-square-root schedule with 4000 warmup steps.
63,082,496 parameters (the paper rounds to 65M).

Needs `wmt14_translate/de-en` prepared with TFDS (array_record) and a shared tokenizer:

    python tools/train_tokenizer.py --tfds-name=wmt14_translate/de-en --text-key=de \
        --vocab-size=37000 --model-type=bpe --output-prefix=runs/wmt14_bpe37k
    jaxformer train --config=configs/transformer_base.py

Paper: 27.3 BLEU on newstest2014 after 100k steps of ~25k source + 25k target tokens.
"""

from jaxformer.config import base_config


def get_config(size: str = "base"):
    big = size == "big"
    c = base_config()
    m = c.model
    m.family = "encoder_decoder"
    m.vocab_size = 37000
    m.d_model, m.d_ff, m.num_heads = (1024, 4096, 16) if big else (512, 2048, 8)
    m.num_layers = m.num_encoder_layers = 6
    m.max_len = 256
    m.position = "sinusoidal"
    m.norm = "layernorm"
    m.norm_position = "post"
    m.norm_eps = 1e-6
    m.mlp = "relu"
    m.use_bias = True
    m.tie_embeddings = True
    m.scale_embeddings = True
    m.dropout = 0.3 if big else 0.1

    d = c.data
    d.name = "tfds"
    d.tfds_name = "wmt14_translate/de-en"
    d.source_key, d.target_key = "en", "de"
    d.train_split, d.eval_split = "train", "validation"
    d.tokenizer = "sentencepiece"
    d.spm_model = "runs/wmt14_bpe37k.model"
    d.seq_len = d.source_seq_len = 256

    o = c.optimizer
    o.name = "adamw"
    o.b1, o.b2, o.eps = 0.9, 0.98, 1e-9
    o.weight_decay = 0.0
    o.clip_norm = 0.0
    o.schedule = "rsqrt"
    o.warmup_steps = 4000
    o.rsqrt_scale = 1.0

    t = c.train
    t.label_smoothing = 0.1
    t.global_batch = 96  # 96 packed rows x 256 tokens ~ 25k target tokens per step
    t.steps = 300_000 if big else 100_000
    t.eval_every = 5000
    t.checkpoint_every = 5000
    t.run_dir = "runs/transformer_big" if big else "runs/transformer_base"
    return c
