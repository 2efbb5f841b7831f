"""Prompt tuning: learned embeddings before the encoder input, the rest frozen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5train import network, optimizers, testing

NUM_PROMPTS = 3


def test_prompts_are_inputs_the_model_sees_like_tokens():
  """Prompts equal to the embeddings of tokens t give the logits of the model without prompts on
  the inputs with t in front: the prompts are positions of the encoder like any token."""
  config = testing.tiny_config(num_prompts=NUM_PROMPTS)
  batch = testing.random_batch()
  tokens = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(network.Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                                     enable_dropout=False)['params'])
  assert params['encoder']['prompt']['prompt'].shape == (NUM_PROMPTS, config.emb_dim)
  ids = np.array([5, 6, 7])
  encoder = {**params['encoder'], 'prompt': {'prompt': params['token_embedder']['embedding'][ids]}}
  with_prompts = network.Transformer(config).apply(
      {'params': {**params, 'encoder': encoder}}, batch['encoder_input_tokens'],
      batch['decoder_input_tokens'], batch['decoder_target_tokens'], enable_dropout=False)
  base_encoder = {name: value for name, value in params['encoder'].items() if name != 'prompt'}
  prefixed = np.concatenate([np.tile(ids, (4, 1)), batch['encoder_input_tokens']], axis=1)
  without = network.Transformer(testing.tiny_config()).apply(
      {'params': {**params, 'encoder': base_encoder}}, prefixed, batch['decoder_input_tokens'],
      batch['decoder_target_tokens'], enable_dropout=False)
  testing.assert_trees_equal(with_prompts, without)


def test_training_moves_the_prompts_only_and_decoding_reads_them():
  config = testing.tiny_config(num_prompts=NUM_PROMPTS)
  multi = optimizers.MultiOptimizer([('encoder/prompt/prompt', optimizers.Adafactor())])
  batch = testing.random_batch()
  model = testing.tiny_model(config, multi)
  parts = testing.tiny_trainer(model, batch, lambda step: 0.3)
  flat = lambda: {optimizers.param_path(p): np.asarray(x) for p, x in
                  traverse_util.flatten_dict(jax.device_get(parts.trainer.train_state.params)).items()}
  before = flat()
  for _ in range(2):
    parts.trainer.train_step(batch)
  after = flat()
  for name in before:
    if name == 'encoder/prompt/prompt':
      assert not np.array_equal(after[name], before[name])
    else:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  decoded = model.predict_batch(parts.trainer.train_state.params,
                                {'encoder_input_tokens': batch['encoder_input_tokens']},
                                max_decode_length=5)
  assert decoded.shape == (4, 5)


def _decoder_only_with_prompt_tokens(ids):
  """A tiny prefix LM with prompts set to the embeddings of ``ids``, and the same model without
  prompts."""
  from t5train import models  # noqa: PLC0415
  with_prompts = testing.tiny_decoder_only_model(
      testing.tiny_config(num_encoder_layers=0, num_prompts=len(ids)))
  params = jax.device_get(nn.unbox(with_prompts.get_initial_variables(
      jax.random.PRNGKey(1), {'decoder_input_tokens': (1, 14)})['params']))
  assert params['decoder']['prompt']['prompt'].shape == (len(ids), testing.tiny_config().emb_dim)
  embedding = params['decoder']['token_embedder']['embedding']
  params['decoder']['prompt']['prompt'] = embedding[np.asarray(ids)]
  without = testing.tiny_decoder_only_model(testing.tiny_config(num_encoder_layers=0))
  base = {**params, 'decoder': {k: v for k, v in params['decoder'].items() if k != 'prompt'}}
  lengths = {'inputs': 8, 'targets': 6}
  examples = [[5, 9, 1], [7, 3, 8, 4, 6, 2, 1]]
  features = [with_prompts.example_features({'inputs': np.asarray(e)}, lengths) for e in examples]
  batch = {name: np.stack([f[name] for f in features]) for name in features[0]}
  in_front = {'decoder_input_tokens': np.tile(ids, (2, 1)),
              'decoder_causal_attention': np.ones((2, len(ids)), np.int32)}
  prefixed = {name: np.concatenate([in_front[name], batch[name]], axis=1).astype(batch[name].dtype)
              for name in in_front}
  assert isinstance(with_prompts, models.DecoderOnlyModel)
  return with_prompts, params, batch, without, base, prefixed


def test_decoder_only_prompts_are_prefix_positions_like_tokens():
  """In a prefix LM, prompts equal to the embeddings of tokens t give the logits (teacher-forced)
  and the greedy decodes of the model without prompts on inputs with t in front."""
  ids = [4, 11, 6]
  model, params, batch, without, base, prefixed = _decoder_only_with_prompt_tokens(ids)
  rng = np.random.default_rng(0)
  region = batch['decoder_causal_attention']
  sequence = np.where(region > 0, batch['decoder_input_tokens'],
                      rng.integers(2, 50, region.shape)).astype(np.int32)
  logits = model.logits(params, {'decoder_input_tokens': sequence,
                                 'decoder_target_tokens': np.ones_like(sequence),
                                 'decoder_causal_attention': region})
  long_sequence = np.concatenate([np.tile(ids, (2, 1)), sequence], axis=1)
  expected = without.logits(base, {'decoder_input_tokens': long_sequence,
                                   'decoder_target_tokens': np.ones_like(long_sequence),
                                   'decoder_causal_attention': prefixed['decoder_causal_attention']})
  testing.assert_trees_close(logits, np.asarray(expected)[:, len(ids):], rtol=testing.SIMPLE_RTOL)
  decodes = model.predict_batch(params, batch, max_decode_length=6)
  np.testing.assert_array_equal(decodes, without.predict_batch(base, prefixed, max_decode_length=6))
