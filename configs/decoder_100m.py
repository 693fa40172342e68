"""A ~100M-parameter LLaMA-style decoder (d_model 768, 14 layers, SwiGLU 2048, RoPE) on
the built-in corpus, byte-level. Used by tools/benchmark.py for the larger CPU figure.

    jaxformer train --config=configs/decoder_100m.py

Too slow to train to convergence on a CPU; on an accelerator use --config.model.dtype=bfloat16.

Set for CPU speed, measured side by side (BENCHMARKS.md, 2026-11-27): layers unrolled
(``scan_layers=False``: no copies in and out of the scan's stacked residuals) and the
32-row batch in 8 microbatches of 4 rows (a working set that stays in cache), 30.3 s a
step, 70.5% of the matmul peak measured in the same run; scanned as one batch 42-45 s.
Same loss either way (gradient accumulation sums the same token losses).
"""

from jaxformer.config import base_config


def get_config():
    c = base_config()
    c.model.d_model = 768
    c.model.num_layers = 14
    c.model.num_heads = 12
    c.model.d_ff = 2048
    c.model.max_len = 1024
    c.model.scan_layers = False
    c.data.seq_len = 512
    c.optimizer.lr = 6e-4
    c.optimizer.warmup_steps = 200
    c.train.steps = 5000
    c.train.global_batch = 32
    c.train.microbatches = 8
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.run_dir = "runs/decoder_100m"
    return c
