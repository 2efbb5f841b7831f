"""Small real objects for tests: a tiny T5 config and model, random batches, a trainer assembled
as the train binary assembles one, and the float tolerances with the helpers that apply them.
Nothing here is mocked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5train import (
  assembly,
  checkpoints,
  decoder_only_network,
  models,
  network,
  optimizers,
  partitioning,
)


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


def tiny_decoder_only_model(config: network.T5Config | None = None,
                            optimizer_def: optimizers.OptimizerDef | None = None,
                            **model_kwargs: object) -> models.DecoderOnlyModel:
  """A 2-layer decoder-only model of ``tiny_config``'s width (a prefix LM unless
  ``inputs_bidirectional_attention=False``)."""
  model_kwargs.setdefault('inputs_bidirectional_attention', True)
  return models.DecoderOnlyModel(
      decoder_only_network.DecoderOnlyTransformer(config or tiny_config(num_encoder_layers=0)),
      vocabulary=None, optimizer_def=optimizer_def or optimizers.AdamW(), **model_kwargs)


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


def tiny_trainer(model: models.EncoderDecoderModel | None = None,
                 batch: dict[str, np.ndarray] | None = None,
                 learning_rate_fn: optimizers.LearningRateFn | None = None, *,
                 partitioner: partitioning.PjitPartitioner | None = None,
                 num_microbatches: int | None = None, skip_nonfinite: bool = False,
                 random_seed: int = 0, model_dir: str | None = None,
                 save_cfg: checkpoints.SaveCheckpointConfig | None = None,
                 restore_cfg: checkpoints.RestoreCheckpointConfig | None = None
                 ) -> assembly.TrainingParts:
  """A training run assembled as the train binary assembles it: by default the tiny model on
  ``random_batch()``'s shapes, a constant learning rate of 1e-3, one device mesh, nothing
  written (``model_dir=None``)."""
  return assembly.assemble_training(
      model or tiny_model(), partitioner or partitioning.PjitPartitioner(),
      input_shapes(batch if batch is not None else random_batch()), model_dir=model_dir,
      save_cfg=save_cfg, restore_cfg=restore_cfg, random_seed=random_seed,
      learning_rate_fn=learning_rate_fn or optimizers.create_learning_rate_scheduler('constant',
                                                                                      1e-3),
      num_microbatches=num_microbatches, skip_nonfinite=skip_nonfinite)


def nan_learning_rate(from_step: int, base: float = 1e-3) -> Callable[[jax.Array], jax.Array]:
  """A schedule that is NaN from (0-based) step ``from_step`` on: injects NaN into training."""
  return lambda step: jnp.where(step >= from_step, jnp.nan, base)


# Float32 tolerances, relative, fixed once here and never loosened to make a test pass. float32
# keeps 24 significant bits, so each rounding is at most 2**-24 = 6e-8 relative.
#   SIMPLE_RTOL: one op or a short chain of ops, in the same order (a loss against a hand
#     computation, a gradient against the plain matmul's): a few roundings, 1e-5 leaves ~170 ulps.
#   COMPOSITE_RTOL: a whole model's result computed in two different orders: scan vs unrolled,
#     remat vs not, fused vs einsum attention, sharded vs one device, microbatched vs whole batch,
#     t5train vs transformers or T5X. Thousands of roundings through reductions of tens to
#     thousands of terms, reassociated differently on each side (by XLA's fusion and the CPU's
#     vector width). AMD EPYC CPUs give gradients up to 1.6e-6 apart, e.g. -0.0052581 vs -0.0052592
#     in a leaf of scale 0.75: 2.2e-4 of the element but 1.5e-6 of the leaf, 60 times below 1e-4
#     (see assert_trees_close for why the leaf's scale is the one that counts).
# An exact contract (pure data movement, or the same ops in the same order on the same inputs)
# uses assert_trees_equal, not a tolerance.
SIMPLE_RTOL = 1e-5
COMPOSITE_RTOL = 1e-4


def _leaves_with_paths(actual: Any, expected: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(path, actual leaf, expected leaf) for two pytrees that must have the same structure."""
  expected_leaves, expected_tree = jax.tree_util.tree_flatten_with_path(expected)
  actual_leaves, actual_tree = jax.tree_util.tree_flatten(actual)
  assert actual_tree == expected_tree, f'tree structures differ:\n{actual_tree}\n{expected_tree}'
  pairs = []
  for (path, want), got in zip(expected_leaves, actual_leaves):
    name, got, want = jax.tree_util.keystr(path) or 'leaf', np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f'{name}: shape {got.shape} != {want.shape}'
    pairs.append((name, got, want))
  return pairs


def assert_trees_close(actual: Any, expected: Any, rtol: float = COMPOSITE_RTOL) -> None:
  """Asserts that two pytrees (or arrays, or numbers) agree leaf by leaf to ``rtol``:
  ``|actual - expected| <= rtol * |expected| + rtol * max|expected leaf|``.

  The absolute term scales with the leaf because the rounding error of a float32 reduction is
  proportional to the magnitudes of the terms summed, which are of the leaf's scale, not to the
  result: an element that cancels to near zero keeps an absolute error of the leaf's scale, and a
  check relative to each element alone would flag that rounding as a bug. A fixed atol would be
  right for one scale only (a loss of 4, a gradient of 1e-3).
  """
  for name, got, want in _leaves_with_paths(actual, expected):
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def assert_trees_equal(actual: Any, expected: Any) -> None:
  """Asserts that two pytrees are bit for bit equal leaf by leaf: for pure data movement (layout
  conversions, checkpoint round trips) and for the same ops run in the same order on the same
  inputs, which float arithmetic reproduces exactly."""
  for name, got, want in _leaves_with_paths(actual, expected):
    np.testing.assert_array_equal(got, want, err_msg=name)
