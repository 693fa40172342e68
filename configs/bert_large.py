"""BERT-large: the preset in configs/bert.py, under its own name.

    jaxformer train --config=configs/bert_large.py

See configs/bert.py for exact parameter counts. Masked-LM training through
``jaxformer train`` is not wired yet (the lead integrates the ``bert`` family).
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "bert.py:large")
