"""Decoding: cached steps against full decoder re-runs, sampling filters, beam search, scoring."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5train import decoding, testing
from t5train.errors import UserError

EOS = 1
LENGTH = 10


@pytest.fixture(scope='module')
def setup():
  """A tiny model with large random weights, so that decodes differ from step to step."""
  model = testing.tiny_model()
  batch = testing.random_batch(batch_size=4, input_length=12, target_length=LENGTH, seed=3)
  shapes = testing.input_shapes(batch)
  params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)['params'])
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [
      jax.random.normal(k, x.shape) * (1.0 if x.ndim == 1 else 0.6) for k, x in zip(keys, leaves)])
  return model, params, batch


def uncached_step(model, params, encoded, encoder_tokens, tokens, state):
  """A decoding step that re-runs the whole decoder over every position so far."""
  repeats = tokens.shape[0] // encoded.shape[0]
  encoded = jnp.repeat(encoded, repeats, axis=0)
  encoder_tokens = jnp.repeat(encoder_tokens, repeats, axis=0)
  inputs = state['inputs'].at[:, state['index']].set(tokens[:, 0])
  logits = model.module.apply({'params': params}, encoded, encoder_tokens, inputs,
                              jnp.ones_like(inputs), enable_dropout=False,
                              method=model.module.decode)
  return logits[:, state['index']], {'inputs': inputs, 'index': state['index'] + 1}


def decode_both_ways(model, params, batch, decode_fn, num_decodes=1, **kwargs):
  """(cached, uncached) outputs of ``decode_fn`` on ``batch``."""
  inputs = batch['encoder_input_tokens']
  encoded = model.module.apply({'params': params}, inputs, enable_dropout=False,
                               method=model.module.encode)
  batch_size = inputs.shape[0]
  state = {'inputs': jnp.zeros((batch_size, LENGTH), jnp.int32),
           'index': jnp.zeros((), jnp.int32)}
  step = functools.partial(uncached_step, model, params, encoded, inputs)
  uncached = jax.jit(lambda s: decode_fn(step, s, batch_size, LENGTH, EOS,
                                         num_decodes=num_decodes, **kwargs))(state)
  cached_model = testing.tiny_model(decode_fn=decode_fn)
  decoder_params = {k: v for k, v in kwargs.items() if k != 'decode_rng'}
  cached = jax.jit(lambda p, b: cached_model.predict_batch_with_aux(
      p, b, rng=kwargs.get('decode_rng'), return_all_decodes=True, num_decodes=num_decodes,
      max_decode_length=LENGTH, decoder_params=decoder_params))(params, batch)
  return (np.asarray(cached[0]), np.asarray(cached[1]['scores'])), jax.device_get(uncached)


def model_scores(model, params, batch, sequences):
  """Log-likelihood of each [batch, length] sequence (up to and including its EOS) by score_batch."""
  has_eos = np.any(sequences == EOS, axis=1)
  eos_positions = np.where(has_eos, np.argmax(sequences == EOS, axis=1), LENGTH - 1)
  weights = (np.arange(LENGTH)[None, :] <= eos_positions[:, None]).astype(np.float32)
  assert np.all(sequences[weights > 0] != 0)  # score_batch reads padding off the targets
  scored = {'encoder_input_tokens': batch['encoder_input_tokens'],
            'decoder_input_tokens': np.asarray(decoding.shift_right(sequences)),
            'decoder_target_tokens': sequences, 'decoder_loss_weights': weights}
  return np.asarray(model.score_batch(params, scored)), eos_positions + 1


def test_cached_greedy_equals_rerunning_the_decoder(setup):
  model, params, batch = setup
  (cached, cached_scores), (uncached, uncached_scores) = decode_both_ways(
      model, params, batch, decoding.temperature_sample, temperature=0.0)
  np.testing.assert_array_equal(cached, uncached)
  testing.assert_trees_close(cached_scores, uncached_scores)
  assert len(np.unique(cached[:, 0, :3])) > 3  # the decodes are not one repeated token


def test_cached_sampling_equals_rerunning_the_decoder(setup):
  model, params, batch = setup
  (cached, _), (uncached, _) = decode_both_ways(
      model, params, batch, decoding.temperature_sample, num_decodes=3, topk=0,
      temperature=1.0, decode_rng=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(cached, uncached)
  assert cached.shape == (4, 3, LENGTH)
  assert len({tuple(row) for row in cached.reshape(-1, LENGTH)}) > 6  # samples differ


def test_cached_beam_search_equals_rerunning_the_decoder(setup):
  model, params, batch = setup
  (cached, cached_scores), (uncached, uncached_scores) = decode_both_ways(
      model, params, batch, decoding.beam_search, num_decodes=4, alpha=0.6)
  np.testing.assert_array_equal(cached, uncached)
  testing.assert_trees_close(cached_scores, uncached_scores)
  assert np.all(np.diff(cached_scores, axis=1) <= 0)  # best first


def test_one_beam_without_length_penalty_is_greedy(setup):
  model, params, batch = setup
  (greedy, _), _ = decode_both_ways(model, params, batch, decoding.temperature_sample,
                                    temperature=0.0)
  (beam, _), _ = decode_both_ways(model, params, batch, decoding.beam_search, num_decodes=1,
                                  alpha=0.0)
  np.testing.assert_array_equal(beam, greedy)


def test_beam_scores_are_model_scores_with_the_length_penalty(setup):
  model, params, batch = setup
  (beams, scores), _ = decode_both_ways(model, params, batch, decoding.beam_search,
                                        num_decodes=3, alpha=0.6)
  log_likelihood, lengths = model_scores(model, params, batch, beams[:, 0])
  penalty = ((5.0 + lengths) / 6.0) ** 0.6
  testing.assert_trees_close(scores[:, 0], log_likelihood / penalty)


def test_greedy_scores_are_model_scores(setup):
  model, params, batch = setup
  (greedy, scores), _ = decode_both_ways(model, params, batch, decoding.temperature_sample,
                                         temperature=0.0)
  log_likelihood, _ = model_scores(model, params, batch, greedy[:, 0])
  testing.assert_trees_close(scores[:, 0], log_likelihood)


def test_top_k_1_sampling_is_greedy(setup):
  model, params, batch = setup
  (greedy, _), _ = decode_both_ways(model, params, batch, decoding.temperature_sample,
                                    temperature=0.0)
  (top1, _), _ = decode_both_ways(model, params, batch, decoding.temperature_sample, topk=1,
                                  temperature=1.5, decode_rng=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(top1, greedy)


def test_score_is_minus_the_per_example_training_loss(setup):
  model, params, batch = setup
  scores = np.asarray(model.score_batch(params, batch))
  for row in range(len(scores)):
    example = {name: value[row:row + 1] for name, value in batch.items()}
    loss, _ = model.loss_fn(params, example, None)
    testing.assert_trees_close(scores[row], -float(loss))


# Decode functions on a fixed next-token distribution, without a model.

PROBS = np.array([0.02, 0.03, 0.5, 0.2, 0.15, 0.1])  # tokens 0..5; EOS (1) is unlikely
# Sampled frequencies are checked to ~3-4 standard deviations, sqrt(p (1 - p) / n): 0.008 for
# p = 0.5 over n = 4000 samples, 0.010 for p = 0.71 over 2000. Statistics, not float rounding.


def fixed_step(log_probs):
  """A step function whose next-token distribution is ``log_probs`` at every position."""
  def step(tokens, cache):
    return jnp.broadcast_to(jnp.asarray(log_probs), (tokens.shape[0], len(log_probs))), cache
  return step


def sample_tokens(rows, **kwargs):
  decodes, _ = decoding.temperature_sample(fixed_step(np.log(PROBS)), None, rows, 1, EOS,
                                           decode_rng=jax.random.PRNGKey(0), **kwargs)
  return np.asarray(decodes[:, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
  # Sorted: 0.5 (2), 0.2 (3), 0.15 (4), 0.1 (5) ... 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15.
  kept = np.asarray(decoding.sampling_logits(jnp.log(PROBS)[None], 1.0, 0, 0.8))[0]
  assert set(np.flatnonzero(kept > decoding.NEG_INF / 2)) == {2, 3, 4}
  tokens = sample_tokens(4000, topk=0, topp=0.8)
  assert set(np.unique(tokens)) == {2, 3, 4}
  np.testing.assert_allclose(np.mean(tokens == 2), 0.5 / 0.85, atol=0.03)


def test_top_k_keeps_the_k_most_likely():
  tokens = sample_tokens(2000, topk=2)
  assert set(np.unique(tokens)) == {2, 3}
  np.testing.assert_allclose(np.mean(tokens == 2), 0.5 / 0.7, atol=0.04)


def test_full_sampling_follows_the_distribution_and_temperature_zero_is_argmax():
  tokens = sample_tokens(4000, topk=0)
  np.testing.assert_allclose(np.bincount(tokens, minlength=6) / 4000, PROBS, atol=0.025)
  assert set(sample_tokens(50, topk=0, temperature=0.0)) == {2}


def test_decoding_stops_at_eos_and_pads_after_it():
  # Row 0 prefers EOS from the third step on, row 1 never: row 0 ends and is padded with 0.
  def step(tokens, cache):
    index, rows = cache, tokens.shape[0]  # rows: 2 examples x their decodes, example-major
    logits = jnp.log(jnp.asarray([[0.01, 0.01, 0.9, 0.04, 0.02, 0.02]] * rows))
    first_example = (jnp.arange(rows) < rows // 2) & (index >= 2)
    logits = logits.at[:, EOS].set(jnp.where(first_example, 5.0, logits[:, EOS]))
    return logits, index + 1

  for decode_fn, kwargs in ((decoding.temperature_sample, {'temperature': 0.0}),
                            (decoding.beam_search, {'num_decodes': 2, 'alpha': 0.0})):
    decodes, _ = decode_fn(step, jnp.zeros((), jnp.int32), 2, 6, EOS, **kwargs)
    best = np.asarray(decodes[:, 0])
    np.testing.assert_array_equal(best[0], [2, 2, EOS, 0, 0, 0])
    np.testing.assert_array_equal(best[1], [2, 2, 2, 2, 2, 2])


def test_sampling_without_an_rng_uses_key_zero():
  step = fixed_step(np.log(PROBS))
  default, _ = decoding.temperature_sample(step, None, 4, 8, EOS, topk=0)
  zero, _ = decoding.temperature_sample(step, None, 4, 8, EOS, topk=0,
                                        decode_rng=jax.random.PRNGKey(0))
  other, _ = decoding.temperature_sample(step, None, 4, 8, EOS, topk=0,
                                         decode_rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(default, zero)
  assert not np.array_equal(default, other)


@pytest.mark.parametrize('settings, named', [
    ({'temperature': -1.0}, 'temperature = -1.0'), ({'topp': 95}, 'topp = 95'),
    ({'topk': -2}, 'topk = -2'), ({'num_decodes': 0}, 'num_decodes = 0')])
def test_sampling_settings_out_of_range_are_refused(settings, named):
  """A negative temperature would invert the distribution and topp outside [0, 1] would be
  ignored: both stop with one line before anything is decoded."""
  with pytest.raises(UserError, match=rf'decoding.temperature_sample: {re.escape(named)} '):
    decoding.temperature_sample(lambda tokens, cache: (None, cache), {}, 1, 4, 1, **settings)
