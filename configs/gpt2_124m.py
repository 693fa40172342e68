"""GPT-2 small (124m): the preset in configs/gpt2.py, under its own name.

jaxformer train --config=configs/gpt2_124m.py
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "gpt2.py:124m")
