"""GPT-2 (Radford et al., 2019) at its four sizes; pick one with the config argument.

    jaxformer train --config=configs/gpt2.py:124m      # or 355m, 774m, 1558m
    python tools/count_params.py --config=configs/gpt2.py:1558m

(configs/gpt2_124m.py ... gpt2_1558m.py name the same presets.)

| size | layers x d_model x heads | parameters (= HF GPT2LMHeadModel) | global batch | steps |
|---|---|---|---|---|
| 124m | 12 x 768 x 12 | 124,439,808 | 512 x 1024 | 5,000 |
| 355m | 24 x 1024 x 16 | 354,823,168 | 512 x 1024 | 14,000 |
| 774m | 36 x 1280 x 20 | 774,030,080 | 512 x 1024 | 30,000 |
| 1558m | 48 x 1600 x 25 | 1,557,611,200 | 1024 x 1024 | 30,000 |

The token table and learned positions are the embedding; the output projection is tied
to the token table and counted once.

Architecture as GPT-2: pre-LN with a final LayerNorm (eps 1e-5, with bias), GELU (tanh
approximation, HF ``gelu_new``), learned positions, tied embeddings, biases everywhere,
d_ff = 4 x d_model, vocabulary 50257. Weights load from and save to ``transformers``
with ``jaxformer.hf`` (docs/models.md).

Tokenizer: GPT-2's byte-level BPE is not shipped with jaxformer, so the data pipeline
uses the byte tokenizer (259 ids; every id is < 50257, so the table keeps GPT-2's shape
and stays interchangeable with Hugging Face checkpoints, with rows 259.. unused).
For a real BPE run, train a 50257-piece SentencePiece model with
``tools/train_tokenizer.py --vocab-size 50257 --model-type bpe`` and pass
``--config.data.tokenizer=sentencepiece --config.data.spm_model=PATH.model``. Token ids
of either tokenizer differ from GPT-2's, so imported OpenAI weights need GPT-2's own
tokenizer (outside jaxformer) to make sense of text.

Training defaults follow GPT-3's table for each size (Brown et al., 2020): peak lr
6e-4 / 3e-4 / 2.5e-4 / 2e-4, AdamW b2 0.95, weight decay 0.1, clip 1.0, about 375M
tokens of warmup, cosine decay to 10%; steps for about 20 tokens per parameter
(Chinchilla). Dropout is 0 (GPT-2 used 0.1; pretraining runs such as
nanoGPT's drop it). The data is the built-in corpus: point ``data.name``/``data.paths``
at a real one.

Meant for accelerators: bf16 compute with fp32 parameters, 4 to 16 microbatches per
step (the global batch must divide over devices x microbatches: lower
``train.microbatches`` on large meshes, raise it if activations do not fit); the two
small sizes are data-parallel (mesh.data=-1), the two large ones shard parameters and
optimizer state over every device (mesh.fsdp=-1) and rematerialise every layer.
These are starting points, not settings tuned by measurement.
"""

from jaxformer.config import base_config

# size: (d_model, layers, heads, peak lr, warmup, steps, global batch, microbatches)
SIZES = {
    "124m": (768, 12, 12, 6e-4, 700, 5_000, 512, 4),
    "355m": (1024, 24, 16, 3e-4, 700, 14_000, 512, 8),
    "774m": (1280, 36, 20, 2.5e-4, 700, 30_000, 512, 8),
    "1558m": (1600, 48, 25, 2e-4, 360, 30_000, 1024, 16),
}


def get_config(size: str = "124m"):
    if size not in SIZES:
        raise ValueError(f"GPT-2 size {size!r}: choose one of {list(SIZES)}")
    d_model, layers, heads, lr, warmup, steps, batch, microbatches = SIZES[size]
    large = d_model >= 1280
    c = base_config()
    m = c.model
    m.vocab_size = 50257
    m.d_model, m.num_layers, m.num_heads, m.d_ff = d_model, layers, heads, 4 * d_model
    m.max_len = 1024
    m.position = "learned"
    m.norm = "layernorm"
    m.norm_position = "pre"
    m.norm_eps = 1e-5
    m.mlp = "gelu"
    m.use_bias = True
    m.tie_embeddings = True
    m.dropout = 0.0
    m.dtype = "bfloat16"
    m.remat = "full" if large else "none"
    c.data.tokenizer = "byte"
    c.data.seq_len = 1024
    o = c.optimizer
    o.lr = lr
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.schedule = "cosine"
    o.warmup_steps = warmup
    o.min_lr_ratio = 0.1
    t = c.train
    t.steps = steps
    t.global_batch = batch
    t.microbatches = microbatches
    t.eval_every = 1000
    t.checkpoint_every = 1000
    t.log_every = 10
    t.run_dir = f"runs/gpt2_{size}"
    c.mesh.data, c.mesh.fsdp = (1, -1) if large else (-1, 1)
    return c
