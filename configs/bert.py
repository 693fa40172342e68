"""BERT (Devlin et al., 2018) at its two sizes, and two CPU-sized ones; pick one with the
config argument.

    jaxformer train --config=configs/bert.py:base      # or large; tiny, mini for a CPU
    python tools/count_params.py --config=configs/bert.py:large

(configs/bert_base.py and configs/bert_large.py name the same presets.)

``jaxformer train`` trains masked LM: packed rows from the data pipeline are masked by
``jaxformer.data.objectives.bert_mask`` (15%; 80% [MASK], 10% random, 10% unchanged,
redrawn every epoch), [MASK] being the first id after the tokenizer's vocabulary.
``--config.data.nsp=True`` adds next-sentence prediction as in the paper: one
``[CLS] A [SEP] B [SEP]`` row per example, B the next span of lines or (50%) a span of
another document, loss = MLM + NSP (``jaxformer/data/bert_tasks.py``); evaluation reports
``nsp_accuracy`` beside the MLM metrics. Fine-tune the result as a classifier with
configs/bert_classify.py (``train.init_from``). Hugging Face weights load and save with
:mod:`jaxformer.hf.bert`.

``tiny`` (2 x 128, 2 heads) and ``mini`` (4 x 256, 4 heads) have the shapes of Turc et
al. (2019)'s BERT-Tiny and BERT-Mini with jaxformer's byte vocabulary (384 ids), 128-token
rows, MLM + NSP and a 2000-step schedule: the pipeline end to end on a CPU in minutes.

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

# size: (d_model, layers, heads, d_ff); tiny and mini are Turc et al. (2019)'s BERT-Tiny/Mini.
SIZES = {
    "tiny": (128, 2, 2, 512),
    "mini": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
CPU_SIZES = ("tiny", "mini")


def get_config(size: str = "base"):
    if size not in SIZES:
        raise ValueError(f"BERT size {size!r}: choose one of {list(SIZES)}")
    d_model, layers, heads, d_ff = SIZES[size]
    c = base_config()
    if size in CPU_SIZES:
        return _cpu_config(c, size)
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


def _cpu_config(c, size: str):
    """BERT-Tiny/Mini's shapes with the byte vocabulary (384 ids), 128-token rows and a
    schedule that shows both objectives learning on a CPU in minutes."""
    d_model, layers, heads, d_ff = SIZES[size]
    m = c.model
    m.family = "bert"
    m.vocab_size = 384  # byte tokenizer (259 ids) + [MASK], padded to a multiple of 128
    m.d_model, m.num_layers, m.num_heads, m.d_ff = d_model, layers, heads, d_ff
    m.max_len = 128
    m.position = "learned"
    m.norm = "layernorm"
    m.norm_position = "post"
    m.norm_eps = 1e-12
    m.mlp = "gelu_exact"
    m.use_bias = True
    m.dropout = 0.1
    d = c.data
    d.seq_len = 128
    d.nsp = True
    # Hold out the same files as stdlib_packages (configs/bert_classify.py), so the
    # classifier is scored on text the pre-training never read.
    d.eval_fraction = 0.2
    o = c.optimizer
    o.lr = 1e-3
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-6
    o.weight_decay = 0.01
    o.schedule = "linear"
    o.warmup_steps = 100
    o.min_lr_ratio = 0.0
    t = c.train
    t.steps = 2000
    t.global_batch = 32
    t.eval_every = 500
    t.checkpoint_every = 500
    t.log_every = 50
    t.run_dir = f"runs/bert_{size}"
    return c
