"""The tolerance helpers: they absorb float32 reordering, and still catch a real error."""

import numpy as np
import pytest

from t5train import testing

# Gradient elements that AMD EPYC CPUs computed in two orders (issue 20), each in a leaf of 256.
AMD_PAIRS = [
    (-0.0052580805, -0.0052592265),  # scan vs per-layer, dots_saveable: 1.1e-6 apart, 2.2e-4 relative
    (0.0182, 0.0182 + 1.6e-6),  # fused (xla) vs einsum attention: 1.6e-6 apart, 8.8e-5 relative
]


def _leaf(seed=0):
  """256 float32 gradient-like values of scale 0.75 (the largest magnitude)."""
  values = np.random.default_rng(seed).normal(size=256).astype(np.float32)
  return (values * 0.75 / np.max(np.abs(values))).astype(np.float32)


def _with(leaf, index, value):
  changed = leaf.copy()
  changed[index] = value
  return changed


@pytest.mark.parametrize('actual,expected', AMD_PAIRS)
def test_reordered_float32_results_are_close(actual, expected):
  leaf = _leaf()
  tree = {'grads': _with(leaf, 7, expected), 'loss': np.float32(3.5)}
  reordered = {'grads': _with(leaf, 7, actual), 'loss': np.float32(3.5 * (1 + 5e-5))}
  testing.assert_trees_close(reordered, tree)
  # A tolerance relative to each element alone (the old rtol=1e-5, atol=1e-6) flagged them.
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(reordered['grads'], tree['grads'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('error', ['off_by_1e-3_of_the_scale', 'sign_flip', 'loss_off_by_3e-4'])
def test_real_errors_are_caught(error):
  leaf = _with(_leaf(), 7, AMD_PAIRS[0][1])
  tree = {'grads': leaf, 'loss': np.float32(3.5)}
  if error == 'off_by_1e-3_of_the_scale':
    wrong = {'grads': _with(leaf, 100, leaf[100] + 0.75e-3), 'loss': tree['loss']}
  elif error == 'sign_flip':
    wrong = {'grads': _with(leaf, 7, -leaf[7]), 'loss': tree['loss']}
  else:  # a scalar leaf is its own scale: allowed 2 x 1e-4 relative
    wrong = {'grads': leaf, 'loss': np.float32(3.5 * (1 + 3e-4))}
  with pytest.raises(AssertionError):
    testing.assert_trees_close(wrong, tree)


def test_structures_and_shapes_must_match():
  leaf = _leaf()
  with pytest.raises(AssertionError, match='tree structures differ'):
    testing.assert_trees_close({'a': leaf}, {'a': leaf, 'b': leaf})
  with pytest.raises(AssertionError, match='shape'):
    testing.assert_trees_close({'a': leaf[:1]}, {'a': np.float32(leaf[0])})


def test_simple_ops_get_the_tighter_tolerance():
  leaf = _leaf()
  nudged = _with(leaf, 3, leaf[3] + 5e-5)  # 6.7e-5 of the scale: composite, not simple
  testing.assert_trees_close(nudged, leaf)
  with pytest.raises(AssertionError):
    testing.assert_trees_close(nudged, leaf, rtol=testing.SIMPLE_RTOL)


def test_equal_means_bit_for_bit():
  leaf = _leaf()
  testing.assert_trees_equal({'a': leaf.copy()}, {'a': leaf})
  with pytest.raises(AssertionError):
    testing.assert_trees_equal({'a': _with(leaf, 0, np.nextafter(leaf[0], np.float32(1)))},
                               {'a': leaf})
