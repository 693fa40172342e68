"""GPT-2 large (774m): the preset in configs/gpt2.py, under its own name.

jaxformer train --config=configs/gpt2_774m.py
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "gpt2.py:774m")
