"""The Transformer big model of Vaswani et al. (2017) on WMT14 English-German: as
configs/transformer_base.py with d_model 1024, 16 heads, FFN 4096, dropout 0.3 and 300k
steps. 214,245,376 parameters (the paper rounds to 213M).

    jaxformer train --config=configs/transformer_big.py

Paper: 28.4 BLEU on newstest2014.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "transformer_base", Path(__file__).with_name("transformer_base.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    return _base.get_config(big=True)
