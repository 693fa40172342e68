"""Micro IsoFLOP sweep on the built-in corpus: 3 budgets x 4 sizes of 2-layer byte-level
decoders (configs/default.py's LLaMA-style block), small enough for 2 CPU cores. The
worked example of docs/scaling.md:

    jaxformer sweep plan --spec configs/sweeps/micro.py --out runs/sweeps/micro
    nice -n 19 jaxformer sweep run --plan runs/sweeps/micro
    jaxformer sweep collect --plan runs/sweeps/micro --out docs/scaling/table.csv
    jaxformer sweep fit --table docs/scaling/table.csv --budget 1e13 --plots docs/scaling

Expected: 12 runs from 12.9k to 190k parameters, 4.3e7 tokens and 1.56e13 FLOPs in all,
27 minutes on 2 CPU cores shared with another job (an upper bound). The 9e11 and
2.7e12 profiles have their minima at 36k and 78k parameters; the 3e11 profile's lies
below its smallest model and approach 2 leaves it out. Both approaches give N_opt growing
about as C^0.7-0.8 and about 200k parameters on 6-7M tokens at 1e13 FLOPs, with wide
bootstrap intervals (docs/scaling/fit.txt).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base_config = "configs/default.py"
    c.overrides = ("--config.train.tensorboard=False", "--config.data.seq_len=128")
    c.shape = ml_collections.ConfigDict()
    c.shape.aspect = 16.0
    c.shape.head_dim = 8
    c.shape.ffn_ratio = 2.75
    c.shape.count = "total"
    c.shape.min_layers = 2  # a fixed-depth family: at these sizes the aspect rule would
    c.shape.max_layers = 2  # jump between 1 and 4 layers, and depth changes add noise
    c.isoflop = ml_collections.ConfigDict()
    c.isoflop.budgets = (3e11, 9e11, 2.7e12)
    c.isoflop.sizes = 4
    c.isoflop.tokens_per_param = (12.0, 600.0)
    c.rules = ml_collections.ConfigDict()
    c.rules.lr = 3e-3
    c.rules.global_batch = 16
    c.rules.warmup_fraction = 0.05
    c.rules.evals = 4
    c.rules.eval_batches = 8
    return c
