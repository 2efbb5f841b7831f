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
