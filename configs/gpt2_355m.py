"""GPT-2 medium (355M), Radford et al. 2019: 24 layers, d_model 1024, 16 heads, context 1024.

    jaxformer train --config=configs/gpt2_355m.py
    python tools/count_params.py --config=configs/gpt2_355m.py

354,823,168 parameters, exactly the count of Hugging Face's ``GPT2LMHeadModel`` for
this size (52,511,744 in the token table and learned positions, 302,311,424 others; the
output projection is tied to the token table and counted once).

Architecture as GPT-2: pre-LN with a final LayerNorm (eps 1e-5, with bias), GELU (tanh
approximation, HF ``gelu_new``), learned positions, tied embeddings, biases everywhere,
d_ff = 4 x d_model, vocabulary 50257. Weights load from and save to ``transformers``
with ``jaxformer.model.hf`` (docs/models.md).

Tokenizer: GPT-2's byte-level BPE is not shipped with jaxformer, so the data pipeline
uses the byte tokenizer (259 ids; every id is < 50257, so the table keeps GPT-2's shape
and stays interchangeable with Hugging Face checkpoints, with rows 259.. unused).
For a real BPE run, train a 50257-piece SentencePiece model with
``tools/train_tokenizer.py --vocab-size 50257 --model-type bpe`` and pass
``--config.data.tokenizer=sentencepiece --config.data.spm_model=PATH.model``. Token ids
of either tokenizer differ from GPT-2's, so imported OpenAI weights need GPT-2's own
tokenizer (outside jaxformer) to make sense of text.

Training defaults follow GPT-3's table for this size (Brown et al., 2020): peak lr 3e-4,
AdamW b2 0.95, weight decay 0.1, clip 1.0, about 375M tokens of warmup, cosine decay to
10%; a global batch of 512 x 1024 tokens for about 20 tokens per parameter
(Chinchilla) in 14,000 steps. Dropout is 0 (GPT-2 used 0.1; pretraining runs such as
nanoGPT's drop it). The data is the built-in corpus: point ``data.name``/``data.paths``
at a real one.

Meant for accelerators: bf16 compute with fp32 parameters, 8 microbatches per step
(the global batch must divide over devices x microbatches: lower ``train.microbatches``
beyond 64 devices, raise it if activations do not fit), and a
data-parallel mesh (mesh.data=-1).
These are starting points, not settings tuned by measurement.
"""

from jaxformer.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 50257
    m.d_model = 1024
    m.num_layers = 24
    m.num_heads = 16
    m.d_ff = 4096
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
    m.remat = "none"
    c.data.tokenizer = "byte"
    c.data.seq_len = 1024
    o = c.optimizer
    o.lr = 3e-4
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.schedule = "cosine"
    o.warmup_steps = 700
    o.min_lr_ratio = 0.1
    t = c.train
    t.steps = 14000
    t.global_batch = 512
    t.microbatches = 8
    t.eval_every = 1000
    t.checkpoint_every = 1000
    t.log_every = 10
    t.run_dir = "runs/gpt2_355m"
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
