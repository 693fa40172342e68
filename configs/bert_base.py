"""BERT-base: the preset in configs/bert.py, under its own name.

    jaxformer train --config=configs/bert_base.py

See configs/bert.py for exact parameter counts and the objectives (masked LM, and
next-sentence prediction with ``--config.data.nsp=True``).
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "bert.py:base")
