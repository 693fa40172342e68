"""The Transformer big model of Vaswani et al. (2017) on WMT14 English-German: as
configs/transformer_base.py with d_model 1024, 16 heads, FFN 4096, dropout 0.3 and 300k
steps. 214,245,376 parameters (the paper rounds to 213M).

    jaxformer train --config=configs/transformer_big.py

Paper: 28.4 BLEU on newstest2014.
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "transformer_base.py:big")
