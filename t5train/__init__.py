"""t5train: train, evaluate and run T5-family encoder-decoder models in JAX."""

__version__ = '0.1.0'
