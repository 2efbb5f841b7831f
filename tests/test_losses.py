"""Loss, z-loss, label smoothing and accuracy against hand computations."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from t5train import losses, testing


def _hand_loss(logits, target, z_loss, label_smoothing):
  vocab = len(logits)
  log_z = math.log(sum(math.exp(x) for x in logits))
  confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
  soft = [confidence if i == target else low for i in range(vocab)]
  cross_entropy = -sum(p * (x - log_z) for p, x in zip(soft, logits))
  entropy = -sum(p * math.log(p) for p in soft if p > 0)
  return cross_entropy - entropy + z_loss * log_z**2, z_loss * log_z**2


@pytest.mark.parametrize('z_loss,label_smoothing', [(0.0, 0.0), (1e-2, 0.0), (1e-4, 0.1),
                                                    (0.0, 0.2)])
def test_weighted_cross_entropy_equals_hand_computation(z_loss, label_smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
  targets = np.array([[1, 4, 0], [2, 2, 3]])
  weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]], np.float32)
  loss, z_total, weight_sum = losses.compute_weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), label_smoothing, z_loss)
  expected_loss = expected_z = 0.0
  for b in range(2):
    for t in range(3):
      token_loss, token_z = _hand_loss(logits[b, t].tolist(), targets[b, t], z_loss,
                                       label_smoothing)
      expected_loss += weights[b, t] * token_loss
      expected_z += weights[b, t] * token_z
  testing.assert_trees_close(float(loss), expected_loss, rtol=testing.SIMPLE_RTOL)
  testing.assert_trees_close(float(z_total), expected_z, rtol=testing.SIMPLE_RTOL)
  assert float(weight_sum) == 4.5  # a sum of halves: exact in float32


def test_perfect_prediction_has_zero_smoothed_loss():
  # With smoothing, the best prediction is the smoothed distribution itself: loss 0.
  vocab, smoothing = 4, 0.1
  probs = np.full(vocab, smoothing / (vocab - 1))
  probs[2] = 1 - smoothing
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None, None]
  loss, _, _ = losses.compute_weighted_cross_entropy(logits, jnp.array([[2]]),
                                                     label_smoothing=smoothing)
  assert abs(float(loss)) < testing.SIMPLE_RTOL  # cross entropy and entropy (0.43) cancel


def test_loss_normalizing_factor_divides():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 7)), jnp.float32)
  targets = jnp.ones((2, 4), jnp.int32)
  total, _, _ = losses.compute_weighted_cross_entropy(logits, targets)
  halved, _, _ = losses.compute_weighted_cross_entropy(logits, targets,
                                                       loss_normalizing_factor=2.0)
  assert float(halved) == float(total) / 2  # the same sum, then halved: exact in float32


def test_num_real_target_tokens_folds_into_weights():
  weights = jnp.array([[1, 1, 0], [1, 0, 0]])
  folded, factor = losses.loss_weights_and_factor(weights, losses.NUM_REAL_TARGET_TOKENS)
  assert factor is None
  np.testing.assert_allclose(np.asarray(folded), np.asarray(weights) / 3.0)
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    losses.loss_weights_and_factor(weights, 'NUM_TOKENS')


def test_accuracy_ignores_padding():
  # Token 0 is padding; the model "predicts" it correctly, which must not count.
  logits = jax_one_hot([[3, 1, 0, 0], [2, 2, 0, 0]], vocab=5)
  targets = jnp.array([[3, 2, 0, 0], [2, 2, 0, 0]])
  weights = (targets > 0).astype(jnp.float32)
  correct, counted = losses.token_accuracy(logits, targets, weights)
  assert (float(correct), float(counted)) == (3.0, 4.0)


def jax_one_hot(ids, vocab):
  return jnp.asarray(np.eye(vocab, dtype=np.float32)[np.asarray(ids)] * 10.0)


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_cross_entropy_and_its_gradient_equal_the_one_hot_formula(label_smoothing):
  # compute_weighted_cross_entropy never builds the one-hot targets; the soft-target
  # formula it stands for gives the same losses and the same gradient.
  import jax
  vocab = 50
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(3, 4, vocab)) * 2, jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (3, 4)))
  weights = jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32)

  def lean(x):
    return losses.compute_weighted_cross_entropy(x, targets, weights, label_smoothing, 1e-3)[0]

  def one_hot(x):
    low = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (1 - label_smoothing - low) + low
    loss, _ = losses.cross_entropy_with_logits(x, soft, 1e-3)
    entropy = -jnp.sum(jnp.where(soft > 0, soft * jnp.log(soft), 0.0), axis=-1)
    return jnp.sum((loss - entropy) * weights)

  testing.assert_trees_close(float(lean(logits)), float(one_hot(logits)), rtol=testing.SIMPLE_RTOL)
  testing.assert_trees_close(jax.grad(lean)(logits), jax.grad(one_hot)(logits),
                             rtol=testing.SIMPLE_RTOL)
