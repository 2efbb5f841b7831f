"""Cross entropy with z-loss and label smoothing, and loss normalisation (pure jnp).

Losses are summed over tokens, as in T5X; the caller chooses how to normalise
them (see ``loss_weights_and_factor``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Normalising by the number of real target tokens in the whole global batch.
NUM_REAL_TARGET_TOKENS = 'NUM_REAL_TARGET_TOKENS'
LossNormalizingFactor = float | int | str | None


def cross_entropy_with_logits(logits: Array, soft_targets: Array,
                              z_loss: float) -> tuple[Array, Array]:
  """Per-token cross entropy plus ``z_loss * log(Z)**2``, and that z-loss term alone.

  The z-loss keeps the softmax normaliser near 1 (log Z near 0), which stabilises
  training with large vocabularies. Shapes: logits [..., vocab] -> [...].
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_softmax = logits - log_z[..., None]
  loss = -jnp.sum(soft_targets * log_softmax, axis=-1)
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


def compute_weighted_cross_entropy(
    logits: Array, targets: Array, weights: Array | None = None, label_smoothing: float = 0.0,
    z_loss: float = 0.0, loss_normalizing_factor: float | None = None,
) -> tuple[Array, Array, Array]:
  """Returns (total loss, total z-loss, total weight), all summed over tokens.

  Equal to ``cross_entropy_with_logits`` on one-hot (smoothed) targets, without
  building them: a large vocabulary costs one pass over the logits, not a
  one-hot array of their size and its gradient.

  With label smoothing, the target distribution puts ``1 - label_smoothing`` on
  the true class and spreads the rest evenly; the entropy of that distribution
  is subtracted so that a perfect prediction has zero loss.
  """
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab_size - 1)
  normalizing_constant = -(confidence * jnp.log(confidence) +
                           (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
  # -sum(soft_targets * log_softmax) without the [..., vocab] soft targets: the targets put
  # low_confidence everywhere plus (confidence - low_confidence) on the true class, and sum to 1.
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  true_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  loss = log_z - (confidence - low_confidence) * true_logit
  if low_confidence:
    loss -= low_confidence * jnp.sum(logits, axis=-1)
  z_term = z_loss * jnp.square(log_z)
  loss = loss + z_term - normalizing_constant
  if weights is None:
    weights = jnp.ones_like(targets, jnp.float32)
  weights = weights.astype(jnp.float32)
  total_loss = jnp.sum(loss * weights)
  total_z = jnp.sum(z_term * weights)
  if loss_normalizing_factor is not None:
    total_loss /= loss_normalizing_factor
    total_z /= loss_normalizing_factor
  return total_loss, total_z, jnp.sum(weights)


def loss_weights_and_factor(weights: Array, loss_normalizing_factor: LossNormalizingFactor
                            ) -> tuple[Array, float | None]:
  """Folds a per-batch normaliser into the weights so that microbatch losses add up.

  ``NUM_REAL_TARGET_TOKENS`` divides by the weight total of the whole batch,
  which must be computed before the batch is split into microbatches.
  """
  if isinstance(loss_normalizing_factor, str):
    if loss_normalizing_factor != NUM_REAL_TARGET_TOKENS:
      raise ValueError(f'unknown loss_normalizing_factor {loss_normalizing_factor!r}; use a '
                       f'number, None or {NUM_REAL_TARGET_TOKENS!r}')
    weights = weights.astype(jnp.float32)
    return weights / jnp.maximum(jnp.sum(weights), 1.0), None
  return weights, None if loss_normalizing_factor is None else float(loss_normalizing_factor)


def token_accuracy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """(number of correct argmax predictions, number of counted tokens); padding is excluded."""
  counted = weights > 0
  correct = (jnp.argmax(logits, axis=-1) == targets) & counted
  return jnp.sum(correct).astype(jnp.float32), jnp.sum(counted).astype(jnp.float32)
