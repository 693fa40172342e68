"""A 1.1B LLaMA-style decoder with TinyLlama-1.1B's shape (Zhang et al. 2024): 22 layers,
d_model 2048, 32 query heads sharing 4 KV heads (GQA), SwiGLU 5632, RoPE, context 2048.
The ~1B model the performance issue measures MFU on, one GPU.

    jaxformer train --config=configs/llama_1b.py        # accelerators only
    python tools/benchmark.py --config=configs/llama_1b.py --config.train.global_batch=16 \\
        --config.train.microbatches=1 --steps=10 --warmup=3

1,100,048,384 parameters, the count of Hugging Face's ``LlamaForCausalLM`` for
TinyLlama-1.1B (65,536,000 in the token table, another 65,536,000 in the untied output
projection). configs/llama2_7b.py narrower, shallower and grouped; the rest as there:
pre-norm RMSNorm (eps 1e-5), no biases, vocabulary 32000, RoPE base 10000, untied.

Optimizer as TinyLlama (and LLaMA-2 but for the peak lr): AdamW b1 0.9, b2 0.95, weight
decay 0.1, clip 1.0, peak lr 4e-4, 2000 warmup steps, cosine to 10%; 2M-token batches
(1024 x 2048) in 8 microbatches. Float32 parameters, gradients and AdamW moments take
17.6 GB; compute in bf16, attention through cuDNN on GPUs (``attention_impl=dot_product``).
Measured on one H100 80GB (BENCHMARKS.md): 16 x 2048 tokens per step with
``microbatches=1``, layers unrolled (``scan_layers=False``: the scan's copies in and out of
its stacked buffers cost ~30 ms a step) and this remat policy (``dots_attention``: the
projections and cuDNN's attention output kept), 0.476 s a step, 68,800 tokens/s, 50.9% MFU,
46 GiB; scanned 0.504 s (48.1%); ``dots_no_batch`` 0.519 s (46.7%); packed rows 0.566 s
(42.8%, the segment mask reaches cuDNN as a bias). Pipeline stages (``mesh.stage``) need
``scan_layers=True``.
"""

from jaxformer.config import sibling_config


def get_config():
    c = sibling_config(__file__, "llama2_7b.py")
    m = c.model
    m.d_model = 2048
    m.num_layers = 22
    m.num_heads = 32
    m.num_kv_heads = 4
    m.d_ff = 5632
    m.max_len = 2048
    m.attention_impl = "dot_product"
    m.remat = "dots_attention"
    m.scan_layers = False
    c.data.seq_len = 2048
    c.optimizer.lr = 4e-4
    c.train.steps = 1_430_512  # 3T tokens / 2M-token batches, as TinyLlama
    c.train.run_dir = "runs/llama_1b"
    return c
