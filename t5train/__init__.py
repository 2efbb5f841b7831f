"""t5train: train, evaluate and run T5-family encoder-decoder models in JAX."""

from t5train import quiet_start

__version__ = '0.1.0'

quiet_start.install()  # before anything imports TensorFlow
