"""BERT (Devlin et al., 2018) at its two sizes; pick one with the config argument.

    jaxformer train --config=configs/bert.py:base      # or large
    python tools/count_params.py --config=configs/bert.py:large

(configs/bert_base.py and configs/bert_large.py name the same presets.)

``jaxformer train`` trains the masked-LM objective (RoBERTa-style, without next-sentence
prediction): packed rows from the data pipeline are masked by
``jaxformer.data.objectives.bert_mask`` (15%; 80% [MASK], 10% random, 10% unchanged,
redrawn every epoch), [MASK] being the first id after the tokenizer's vocabulary. The NSP
head and the sequence-classification head exist on :class:`jaxformer.model.bert.Bert`
but their data paths and a fine-tuning command are not built yet. Hugging Face weights
load and save with :mod:`jaxformer.model.hf_bert`.

| size | layers x d_model x heads, FFN | encoder + pooler | + MLM and NSP heads |
|---|---|---|---|
| base | 12 x 768 x 12, 3072 | 109,482,240 | 110,106,428 |
| large | 24 x 1024 x 16, 4096 | 335,141,888 | 336,226,108 |

The last column equals Hugging Face's ``BertForPreTraining`` (the MLM output is tied to
the word table and counted once; its output bias, the MLM transform and NSP are counted).

Architecture: WordPiece vocabulary 30522, 512 learned positions, 2 token types, post-LN
LayerNorm (eps 1e-12) after the embeddings and each sublayer, exact (erf) GELU, biases
everywhere, dropout 0.1 (jaxformer has none on attention probabilities). Training as the
paper: Adam lr 1e-4, b2 0.999, weight decay 0.01, 10k warmup steps then linear decay to
0, batch 256 x 512 tokens, 1M steps.
"""

from jaxformer.config import base_config

# size: (d_model, layers, heads, d_ff)
SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}


def get_config(size: str = "base"):
    if size not in SIZES:
        raise ValueError(f"BERT size {size!r}: choose one of {list(SIZES)}")
    d_model, layers, heads, d_ff = SIZES[size]
    c = base_config()
    m = c.model
    m.family = "bert"
    m.vocab_size = 30522
    m.d_model, m.num_layers, m.num_heads, m.d_ff = d_model, layers, heads, d_ff
    m.max_len = 512
    m.type_vocab_size = 2
    m.position = "learned"
    m.norm = "layernorm"
    m.norm_position = "post"
    m.norm_eps = 1e-12
    m.mlp = "gelu_exact"
    m.use_bias = True
    m.tie_embeddings = True
    m.dropout = 0.1
    m.remat = "full" if size == "large" else "none"
    c.data.seq_len = 512
    o = c.optimizer
    o.name = "adamw"
    o.lr = 1e-4
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-6
    o.weight_decay = 0.01
    o.clip_norm = 1.0
    o.schedule = "linear"
    o.warmup_steps = 10_000
    o.min_lr_ratio = 0.0
    t = c.train
    t.steps = 1_000_000
    t.global_batch = 256
    t.eval_every = 10_000
    t.checkpoint_every = 10_000
    t.log_every = 100
    t.run_dir = f"runs/bert_{size}"
    return c
