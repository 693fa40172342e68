"""jaxformer: Transformer training with JAX and Flax NNX."""

__version__ = "0.1.0"
