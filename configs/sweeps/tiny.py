"""Smoke-test sweep: one tiny decoder trained for two token counts (an N x D grid of 1 x 2),
seconds on a CPU. tests/test_scaling_run.py runs it; use it to try the commands.

    jaxformer sweep plan --spec configs/sweeps/tiny.py --out runs/sweeps/tiny
    jaxformer sweep run --plan runs/sweeps/tiny --parallel 2
    jaxformer sweep collect --plan runs/sweeps/tiny

Expected: 2 runs of a 2-layer, d_model 32 decoder (grid_n20.6k_d7.68k, 30 steps, and
grid_n20.6k_d102k, 400 steps) finish in well under a minute on 2 CPU cores; a second
`sweep run` finds both done and trains nothing; the table holds both, the longer run at
the lower loss.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base_config = "configs/default.py"
    c.overrides = (
        "--config.model.max_len=32",
        "--config.data.seq_len=32",
        "--config.train.tensorboard=False",
    )
    c.shape = ml_collections.ConfigDict()
    c.shape.aspect = 16.0
    c.shape.head_dim = 16
    c.shape.ffn_ratio = 2.0
    c.grid = ml_collections.ConfigDict()
    c.grid.params = (20e3,)
    c.grid.tokens = (30 * 8 * 32, 400 * 8 * 32)  # 30 and 400 steps of 8 x 32 tokens
    c.rules = ml_collections.ConfigDict()
    c.rules.global_batch = 8
    c.rules.evals = 1
    c.rules.eval_batches = 2
    c.rules.checkpoints = 8
    c.rules.logs = 10
    return c
