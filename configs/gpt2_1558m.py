"""GPT-2 XL (1558m): the preset in configs/gpt2.py, under its own name.

jaxformer train --config=configs/gpt2_1558m.py
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "gpt2.py:1558m")
