"""Small real objects for tests: a tiny T5 config and model, random batches."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from t5train import models, network, optimizers


def tiny_config(**overrides: object) -> network.T5Config:
  """A 2+2-layer, 16-wide T5 1.1 over a 64-token vocabulary, float32, no dropout."""
  fields = dict(vocab_size=64, dtype=jnp.float32, emb_dim=16, num_heads=2, num_encoder_layers=2,
                num_decoder_layers=2, head_dim=8, mlp_dim=32, mlp_activations=('gelu', 'linear'),
                dropout_rate=0.0, logits_via_embedding=False)
  fields.update(overrides)
  return network.T5Config(**fields)


def tiny_model(config: network.T5Config | None = None,
               optimizer_def: optimizers.OptimizerDef | None = None,
               **model_kwargs: object) -> models.EncoderDecoderModel:
  return models.EncoderDecoderModel(
      network.Transformer(config or tiny_config()), input_vocabulary=None,
      output_vocabulary=None, optimizer_def=optimizer_def or optimizers.AdamW(),
      **model_kwargs)


def random_batch(batch_size: int = 4, input_length: int = 12, target_length: int = 8,
                 vocab_size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  """An unpacked encoder-decoder batch with trailing padding of varying lengths."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, (batch_size, input_length)).astype(np.int32)
  targets = rng.integers(2, vocab_size, (batch_size, target_length)).astype(np.int32)
  for row in range(batch_size):
    inputs[row, rng.integers(input_length // 2, input_length + 1):] = 0
    targets[row, rng.integers(target_length // 2, target_length + 1):] = 0
  return {
      'encoder_input_tokens': inputs,
      'decoder_target_tokens': targets,
      'decoder_input_tokens': np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
      'decoder_loss_weights': (targets > 0).astype(np.float32),
  }


def input_shapes(batch: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
  return {name: value.shape for name, value in batch.items()}


def nan_learning_rate(from_step: int, base: float = 1e-3) -> Callable[[jax.Array], jax.Array]:
  """A schedule that is NaN from (0-based) step ``from_step`` on: injects NaN into training."""
  return lambda step: jnp.where(step >= from_step, jnp.nan, base)
