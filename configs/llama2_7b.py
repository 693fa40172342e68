"""LLaMA-2 7B, Touvron et al. 2023: 32 layers, d_model 4096, 32 heads, SwiGLU 11008, RoPE.

    jaxformer train --config=configs/llama2_7b.py      # on an accelerator cluster only
    python tools/count_params.py --config=configs/llama2_7b.py

6,738,415,616 parameters, exactly the count of Hugging Face's ``LlamaForCausalLM`` for
Llama-2-7b (131,072,000 in the token table, 6,607,343,616 others, of which the untied
output projection is 131,072,000).

Architecture as LLaMA-2 7B: pre-norm RMSNorm (eps 1e-5, scale only), SwiGLU MLP of width
11008, RoPE with base 10000 rotating the two halves of each head (as Hugging Face's
``rotate_half``), 32 query and 32 KV heads (the 70B model's GQA is
``--config.model.num_kv_heads=8``), context 4096, no biases, untied output, vocabulary
32000. Weights load from and save to ``transformers`` with ``jaxformer.hf``.

Tokenizer: LLaMA's SentencePiece model is not shipped with jaxformer; the pipeline uses
the byte tokenizer (259 ids < 32000). Train a 32000-piece model with
``tools/train_tokenizer.py --vocab-size 32000 --model-type bpe`` and pass
``--config.data.tokenizer=sentencepiece --config.data.spm_model=PATH.model`` for a real
run; imported Meta weights need Meta's tokenizer (outside jaxformer) to read text.

Optimizer as the paper: AdamW b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1, clip 1.0,
peak lr 3e-4, 2000 warmup steps, cosine decay to 10% of the peak; 4M-token batches
(1024 x 4096) for 476,837 steps = 2.0T tokens.

Not trainable on a CPU: float32 parameters and AdamW moments alone take 81 GB (108 GB
with gradients), beyond a laptop's or CI machine's memory. It validates and counts anywhere
(``tools/count_params.py`` uses ``jax.eval_shape``, allocating nothing). On accelerators:
bf16 compute with fp32 parameters, parameters and optimizer state sharded over every
device (mesh.fsdp=-1), every layer rematerialised, 8 microbatches per step (the global
batch must divide over devices x microbatches: lower ``train.microbatches`` beyond 128
devices). These are starting points, not settings tuned by measurement.
"""

from jaxformer.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 32000
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 0  # = num_heads: MHA, as the 7B model
    m.head_dim = 0  # = 4096 / 32 = 128
    m.d_ff = 11008
    m.max_len = 4096
    m.position = "rope"
    m.rope_base = 10000.0
    m.norm = "rmsnorm"
    m.norm_position = "pre"
    m.norm_eps = 1e-5
    m.mlp = "swiglu"
    m.use_bias = False
    m.tie_embeddings = False
    m.dropout = 0.0
    m.dtype = "bfloat16"
    m.remat = "full"
    c.data.tokenizer = "byte"
    c.data.seq_len = 4096
    o = c.optimizer
    o.name = "adamw"
    o.lr = 3e-4
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-5
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.schedule = "cosine"
    o.warmup_steps = 2000
    o.min_lr_ratio = 0.1
    t = c.train
    t.steps = 476_837
    t.global_batch = 1024
    t.microbatches = 8
    t.eval_every = 1000
    t.checkpoint_every = 1000
    t.log_every = 10
    t.run_dir = "runs/llama2_7b"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
