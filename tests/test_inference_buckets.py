"""Inference decodes examples by input length in cut-down batches and returns them in order."""

import jax
import numpy as np
import pytest

from t5train import decoding, inference, partitioning, testing

LENGTHS = {'inputs': 128, 'targets': 8}


def test_input_buckets_are_fractions_of_the_padded_length():
  assert [inference.input_bucket(n, 256) for n in (0, 31, 32, 33, 64, 65, 129, 256)] == [
      32, 32, 32, 64, 64, 128, 256, 256]
  assert inference.input_bucket(3, 64) == 32  # never below MIN_INPUT_BUCKET
  assert inference.input_bucket(3, 16) == 16  # a shorter task keeps its own length
  assert inference.input_length({'encoder_input_tokens': np.array([5, 0, 7, 0, 0])}) == 3


@pytest.mark.parametrize('decode_fn', [decoding.temperature_sample, decoding.beam_search],
                         ids=['greedy', 'beam'])
def test_bucketed_inference_equals_padded_inference_in_the_examples_order(decode_fn):
  model = testing.tiny_model(decode_fn=decode_fn)
  shapes = model.input_shapes(4, LENGTHS)
  params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes)['params'])(
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # Mostly short inputs and one long one, in no particular order.
  examples = [{'inputs': rng.integers(2, 60, n), 'targets': rng.integers(2, 60, 5)}
              for n in (3, 40, 5, 12, 2, 7, 30, 4, 9, 6, 100)]
  features = [model.example_features(ex, LENGTHS) for ex in examples]
  partitioner = partitioning.PjitPartitioner()
  shardings = jax.tree.map(lambda _: partitioner.sharding(jax.sharding.PartitionSpec()), params)
  runs = {}
  for bucketed in (True, False):
    runner = inference.InferenceRunner(model, partitioner, shardings, batch_size=4,
                                       max_decode_length=8, bucket_inputs=bucketed)
    widths = [batch['encoder_input_tokens'].shape[1]
              for batch, _ in runner._batches([features[i] for i in runner._order(features)])]
    tokens, scores = runner.predict(params, features)
    runs[bucketed] = widths, np.stack(tokens), np.asarray(scores), runner.score(params, features)
  (widths, tokens, scores, score), (padded_widths, *padded) = runs[True], runs[False]
  assert widths == [32, 32, 128] and padded_widths == [128, 128, 128]
  np.testing.assert_array_equal(tokens, padded[0])
  testing.assert_trees_close((scores, np.asarray(score)), (padded[1], np.asarray(padded[2])))
