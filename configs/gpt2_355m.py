"""GPT-2 medium (355m): the preset in configs/gpt2.py, under its own name.

jaxformer train --config=configs/gpt2_355m.py
"""

from jaxformer.config import sibling_config


def get_config():
    return sibling_config(__file__, "gpt2.py:355m")
