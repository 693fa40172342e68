"""Attention: masks, the einsum reference and the fused backends behind one signature.

The model calls whichever backend object its ``ModelConfig.attention`` holds; the
backend is chosen once, outside the model, by :func:`jaxformer.attention.registry.select`.
"""
