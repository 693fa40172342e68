"""T5 1.0 large: the preset in configs/t5.py, under its own name.

jaxformer train --config=configs/t5_large.py
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "t5.py:large")
