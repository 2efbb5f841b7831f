"""Properties of the network: causal decoder, packing equivalence, parameter axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5train import network, testing


def _init(config, batch):
  model = network.Transformer(config)
  variables = model.init(jax.random.PRNGKey(0), batch['encoder_input_tokens'],
                         batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                         enable_dropout=False)
  return model, nn.unbox(variables)


def _logits(model, variables, batch, **kwargs):
  return np.asarray(model.apply(variables, batch['encoder_input_tokens'],
                                batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                                enable_dropout=False, **kwargs))


def test_decoder_is_causal():
  batch = testing.random_batch(batch_size=2, target_length=10)
  batch['decoder_target_tokens'][:] = np.maximum(batch['decoder_target_tokens'], 2)
  model, variables = _init(testing.tiny_config(), batch)
  before = _logits(model, variables, batch)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['decoder_input_tokens'][:, 6:] = 5  # change inputs at positions 6..9
  after = _logits(model, variables, changed)
  # Exact: positions 6.. enter earlier ones only through attention weights that are exactly 0
  # (a -1e10 bias, exp underflows), and every other op is per position, in the same order.
  testing.assert_trees_equal(after[:, :6], before[:, :6])
  assert np.abs(after[:, 6:] - before[:, 6:]).max() > 1e-3


def test_encoder_padding_is_ignored():
  batch = testing.random_batch(batch_size=1, input_length=12)
  batch['encoder_input_tokens'][0, 6:] = 0
  model, variables = _init(testing.tiny_config(), batch)
  longer = {k: v.copy() for k, v in batch.items()}
  longer['encoder_input_tokens'] = np.pad(batch['encoder_input_tokens'], ((0, 0), (0, 5)))
  # Another length: the whole model reduces in other orders.
  testing.assert_trees_close(_logits(model, variables, longer), _logits(model, variables, batch))


def _pack(examples, input_length, target_length):
  """Concatenates examples into one row with segment ids, as seqio's packing does."""
  packed = {name: np.zeros((1, length), np.int32) for name, length in (
      ('encoder_input_tokens', input_length), ('encoder_segment_ids', input_length),
      ('decoder_target_tokens', target_length), ('decoder_input_tokens', target_length),
      ('decoder_segment_ids', target_length))}
  enc = dec = 0
  for segment, (inputs, targets) in enumerate(examples, start=1):
    packed['encoder_input_tokens'][0, enc:enc + len(inputs)] = inputs
    packed['encoder_segment_ids'][0, enc:enc + len(inputs)] = segment
    packed['decoder_target_tokens'][0, dec:dec + len(targets)] = targets
    packed['decoder_input_tokens'][0, dec:dec + len(targets)] = [0] + list(targets[:-1])
    packed['decoder_segment_ids'][0, dec:dec + len(targets)] = segment
    enc, dec = enc + len(inputs), dec + len(targets)
  return packed


def test_packed_logits_equal_unpacked():
  rng = np.random.default_rng(3)
  examples = [(rng.integers(2, 64, n), rng.integers(2, 64, m)) for n, m in ((5, 4), (7, 3), (4, 5))]
  packed = _pack(examples, input_length=20, target_length=14)
  model, variables = _init(testing.tiny_config(), packed)
  packed_logits = _logits(model, variables, packed,
                          encoder_segment_ids=packed['encoder_segment_ids'],
                          decoder_segment_ids=packed['decoder_segment_ids'])
  offset = 0
  for inputs, targets in examples:
    single = {'encoder_input_tokens': np.asarray([inputs], np.int32),
              'decoder_target_tokens': np.asarray([targets], np.int32),
              'decoder_input_tokens': np.asarray([[0] + list(targets[:-1])], np.int32)}
    expected = _logits(model, variables, single)[0]
    testing.assert_trees_close(packed_logits[0, offset:offset + len(targets)], expected)
    offset += len(targets)


def test_every_parameter_has_logical_axes_matching_its_rank():
  batch = testing.random_batch()
  model = network.Transformer(testing.tiny_config())
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), batch['encoder_input_tokens'], batch['decoder_input_tokens'],
      batch['decoder_target_tokens'], enable_dropout=False))
  specs = nn.get_partition_spec(boxed)['params']
  shapes = nn.unbox(boxed)['params']
  flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  assert len(flat_specs) == len(flat_shapes) > 0
  known = {'embed', 'vocab', 'heads', 'joined_kv', 'mlp', 'relpos_buckets'}
  for spec, shape in zip(flat_specs, flat_shapes):
    assert len(spec) == len(shape.shape)
    assert set(spec) <= known


def test_parameters_stay_float32_in_bfloat16_models():
  batch = testing.random_batch()
  model, variables = _init(testing.tiny_config(dtype=jnp.bfloat16), batch)
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert _logits(model, variables, batch).dtype == np.float32


def test_relative_position_buckets_are_t5s():
  # Bidirectional, 32 buckets, max distance 128: exact for |d| < 8, log-spaced beyond,
  # keys after the query use the upper half of the buckets.
  rel = np.array([-200, -128, -20, -8, -7, -1, 0, 1, 7, 8, 20, 128, 200])
  buckets = network.relative_position_bucket(rel, True, 32, 128)
  assert buckets.tolist() == [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31]
  causal = network.relative_position_bucket(rel, False, 32, 128)
  assert causal[rel >= 0].tolist() == [0] * 7
  assert causal[rel == -20].item() == 17  # 16 + floor(log(20/16) / log(128/16) * 16)


def test_dropout_is_active_only_with_an_rng_and_reproducible():
  batch = testing.random_batch()
  model, variables = _init(testing.tiny_config(dropout_rate=0.3), batch)
  args = (batch['encoder_input_tokens'], batch['decoder_input_tokens'],
          batch['decoder_target_tokens'])
  plain = _logits(model, variables, batch)
  drop = lambda seed: np.asarray(model.apply(variables, *args, enable_dropout=True,
                                             rngs={'dropout': jax.random.PRNGKey(seed)}))
  assert np.abs(drop(0) - plain).max() > 1e-3
  np.testing.assert_array_equal(drop(0), drop(0))
  assert np.abs(drop(0) - drop(1)).max() > 1e-3


def test_dense_gradients_equal_plain_matmul_gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  loss = lambda matmul: lambda x, k: jnp.sum(jnp.sin(matmul(x, k)))
  ours = jax.grad(loss(network._matmul), argnums=(0, 1))(x, kernel)
  plain = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, kernel)
  testing.assert_trees_close(ours, plain, rtol=testing.SIMPLE_RTOL)
