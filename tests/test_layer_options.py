"""scan_layers and remat_policy: the same model, laid out or recomputed differently."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5train import (
  checkpoint_reading,
  checkpoints,
  decoding,
  network,
  optimizers,
  partitioning,
  testing,
  train_state,
  trainer,
)
from t5train.errors import UserError

# Each policy once, scanned and not (the trainer test below adds scanned dots_saveable).
OPTIONS = [(False, 'dots_saveable'), (True, 'none'), (True, 'full')]
# bfloat16 keeps 8 significant bits (one rounding is 2**-9 = 2e-3 relative); cuDNN's fused
# attention orders and rounds its intermediates otherwise than the einsum path, so a whole model's
# loss and gradients differ from the same-dtype einsum's by several bfloat16 roundings.
BF16_CUDNN_RTOL, BF16_CUDNN_ATOL = 5e-2, 5e-3


@pytest.fixture(scope='module')
def reference():
  """Per-layer parameters of the tiny model, a batch, and the loss and gradients there."""
  model = testing.tiny_model()
  batch = testing.random_batch(seed=5)
  params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0),
                                                testing.input_shapes(batch))['params'])
  (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None)
  return params, batch, float(loss), grads


@pytest.mark.parametrize('scan,remat', OPTIONS)
def test_loss_and_gradients_do_not_depend_on_the_layer_options(reference, scan, remat):
  params, batch, loss, grads = reference
  model = testing.tiny_model(testing.tiny_config(scan_layers=scan, remat_policy=remat))
  if scan:
    params = network.stack_layers(params)
  (got_loss, _), got_grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, None)
  testing.assert_trees_close(float(got_loss), loss)
  testing.assert_trees_close(network.unstack_layers(got_grads) if scan else got_grads, grads)


def test_scanned_parameters_are_stacked_with_a_layers_axis():
  model = testing.tiny_model(testing.tiny_config(scan_layers=True))
  variables = model.get_initial_variables(jax.random.PRNGKey(0),
                                          testing.input_shapes(testing.random_batch()))
  query = variables['params']['encoder']['layers']['attention']['query']['kernel']
  assert query.value.shape == (2, 16, 16)  # [layers, embed, heads x head_dim]
  assert query.names == ('layers', 'embed', 'joined_kv')
  assert 'layers_0' not in variables['params']['decoder']
  # The layers were initialised independently.
  assert not np.allclose(query.value[0], query.value[1])


def test_stack_and_unstack_are_inverse(reference):
  params = reference[0]
  stacked = network.stack_layers(params, {'encoder': 2, 'decoder': 2})
  assert stacked['decoder']['layers']['mlp']['wo']['kernel'].shape == (2, 32, 16)
  testing.assert_trees_equal(network.unstack_layers(stacked), params)  # pure data movement
  with pytest.raises(ValueError, match='encoder has 2 layers, expected 3'):
    network.stack_layers(params, {'encoder': 3, 'decoder': 2})


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="unknown remat_policy 'some'"):
    testing.tiny_config(remat_policy='some')


@pytest.mark.parametrize('method', ['greedy', 'beam'])
def test_scanned_decoding_equals_per_layer_decoding(reference, method):
  params, batch = reference[0], reference[1]
  decode_fn = (functools.partial(decoding.temperature_sample, temperature=0.0)
               if method == 'greedy' else functools.partial(decoding.beam_search, alpha=0.6))
  outputs = []
  for scan, layer_params in ((False, params), (True, network.stack_layers(params))):
    model = testing.tiny_model(testing.tiny_config(scan_layers=scan, remat_policy='full'),
                               decode_fn=decode_fn)
    tokens, aux = jax.jit(lambda p, b, m=model: m.predict_batch_with_aux(
        p, b, num_decodes=1 if method == 'greedy' else 3, max_decode_length=8))(
            layer_params, batch)
    outputs.append((np.asarray(tokens), np.asarray(aux['scores'])))
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
  testing.assert_trees_close(outputs[0][1], outputs[1][1])


def _initializer(model, batch):
  return train_state.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, testing.input_shapes(batch),
      partitioner=partitioning.PjitPartitioner())


def _scanned_model(remat='none'):
  return testing.tiny_model(testing.tiny_config(scan_layers=True, remat_policy=remat))


def test_training_steps_agree_scanned_and_per_layer():
  # The trainer builds shardings from the scanned layout's logical axes ('layers' first).
  batch = testing.random_batch(seed=7)
  schedule = optimizers.create_learning_rate_scheduler('constant', 1e-2)
  per_layer = testing.tiny_model()
  initializer = _initializer(per_layer, batch)
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  stacked = network.stack_layers(jax.device_get(state.params))  # before the step donates them
  scanned = _scanned_model('dots_saveable')
  scanned_initializer = _initializer(scanned, batch)
  losses = []
  for model, init, start in ((per_layer, initializer, state),
                             (scanned, scanned_initializer,
                              scanned_initializer.from_params(stacked, np.int32(0)))):
    t = trainer.Trainer(model, start, partitioning.PjitPartitioner(), init.train_state_axes,
                        jax.random.PRNGKey(1), schedule)
    losses.append([float(t.train_step(batch)['loss'].compute()) for _ in range(3)])
  testing.assert_trees_close(losses[0], losses[1])


def test_checkpoints_convert_between_layouts(tmp_path):
  batch = testing.random_batch()
  per_layer, scanned = testing.tiny_model(), _scanned_model()
  per_layer_init, scanned_init = _initializer(per_layer, batch), _initializer(scanned, batch)
  params = jax.device_get(per_layer_init.from_scratch(jax.random.PRNGKey(0)).params)
  path = checkpoints.save_params(str(tmp_path / 'per_layer'), params, step=3)

  # Converting layouts only moves data: bit for bit.
  state = checkpoint_reading.restore_from_path(path, scanned_init)
  assert int(state.step) == 3
  testing.assert_trees_equal(jax.device_get(state.params), network.stack_layers(params))
  testing.assert_trees_equal(jax.device_get(checkpoint_reading.restore_params(path, scanned_init)),
                             network.stack_layers(params))

  # And back: a scanned checkpoint restores into the per-layer model.
  back = checkpoints.save_params(str(tmp_path / 'scanned'), jax.device_get(state.params), step=4)
  testing.assert_trees_equal(
      jax.device_get(checkpoint_reading.restore_from_path(back, per_layer_init).params), params)


def test_resuming_with_the_other_layout_says_how_to_convert(tmp_path):
  batch = testing.random_batch()
  per_layer_init = _initializer(testing.tiny_model(), batch)
  scanned_init = _initializer(_scanned_model(), batch)
  config = checkpoints.SaveCheckpointConfig(period=1, save_dataset=False, use_async=False)
  manager = checkpoints.CheckpointManager(str(tmp_path), config,
                                          per_layer_init.train_state_shardings,
                                          per_layer_init.global_train_state_shape)
  manager.save(per_layer_init.from_scratch(jax.random.PRNGKey(0)), force=True)
  manager.close()
  manager = checkpoints.CheckpointManager(str(tmp_path), config,
                                          scanned_init.train_state_shardings,
                                          scanned_init.global_train_state_shape)
  with pytest.raises(UserError, match='saved without scan_layers.*INITIAL_CHECKPOINT_PATH'):
    manager.restore()
  manager.close()


def _count_fused_calls(monkeypatch):
  """The implementations jax.nn.dot_product_attention is called with, as the model traces."""
  calls, fused = [], jax.nn.dot_product_attention

  def counted(*args, **kwargs):
    calls.append(kwargs['implementation'])
    return fused(*args, **kwargs)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', counted)
  return calls


@pytest.mark.parametrize('implementation', ['xla', 'cudnn'])
def test_fused_attention_equals_the_einsum_attention(reference, implementation, monkeypatch):
  # jax.nn.dot_product_attention with T5's bias and no scaling: the same loss and gradients.
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    pytest.skip('cuDNN attention needs an NVIDIA GPU')
  params, batch, loss, grads = reference
  dtype = 'bfloat16' if implementation == 'cudnn' else 'float32'  # cuDNN: 16-bit floats only
  if dtype == 'bfloat16':  # the einsum reference in the same dtype
    einsum = testing.tiny_model(testing.tiny_config(dtype=dtype))
    (loss, _), grads = jax.jit(jax.value_and_grad(einsum.loss_fn, has_aux=True))(
        params, batch, None)
  model = testing.tiny_model(testing.tiny_config(dtype=dtype,
                                                 attention_implementation=implementation))
  calls = _count_fused_calls(monkeypatch)
  (got_loss, _), got_grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, None)
  # Encoder self-attention, decoder self- and cross-attention, in each of the 2 + 2 layers.
  assert calls == [implementation] * 6
  if dtype == 'bfloat16':
    assert float(got_loss) == pytest.approx(float(loss), rel=BF16_CUDNN_RTOL)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=BF16_CUDNN_RTOL, atol=BF16_CUDNN_ATOL), got_grads, grads)
  else:
    testing.assert_trees_close(float(got_loss), float(loss))
    testing.assert_trees_close(got_grads, grads)


def test_fused_attention_keeps_dropout_and_decoding_on_the_einsum_path(reference, monkeypatch):
  params, batch = reference[0], reference[1]
  calls = _count_fused_calls(monkeypatch)
  outputs = []
  for implementation in (None, 'xla'):
    config = testing.tiny_config(dropout_rate=0.3, attention_implementation=implementation)
    model = testing.tiny_model(config, decode_fn=functools.partial(decoding.temperature_sample,
                                                                   temperature=0.0))
    loss, _ = model.loss_fn(params, batch, jax.random.PRNGKey(3))
    assert not calls  # attention dropout is t5train's own
    tokens = model.predict_batch(params, batch, max_decode_length=8)
    outputs.append((float(loss), np.asarray(tokens)))
  assert calls == ['xla'] * 2  # the encoder while decoding; cached decoder steps are not fused
  # With dropout both take the einsum path: the same ops in the same order, so the same loss.
  assert outputs[0][0] == outputs[1][0]
  np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


def test_per_layer_relative_position_tables_scan_and_decode_like_per_layer_ones():
  """umT5's table in every layer: scanned, it is stacked like any layer parameter, and both the
  loss and greedy decoding equal the per-layer model's."""
  batch = testing.random_batch(seed=9)
  per_layer = testing.tiny_model(testing.tiny_config(relative_attention_per_layer=True))
  params = nn.unbox(per_layer.get_initial_variables(jax.random.PRNGKey(1),
                                                    testing.input_shapes(batch))['params'])
  assert params['decoder']['layers_1']['relpos_bias']['rel_embedding'].shape == (2, 32)
  scanned = testing.tiny_model(testing.tiny_config(relative_attention_per_layer=True,
                                                   scan_layers=True))
  stacked = network.stack_layers(params)
  assert stacked['encoder']['layers']['relpos_bias']['rel_embedding'].shape == (2, 2, 32)
  losses = [float(model.loss_fn(p, batch, None)[0]) for model, p in ((per_layer, params),
                                                                      (scanned, stacked))]
  testing.assert_trees_close(losses[0], losses[1])
  inputs = {'encoder_input_tokens': batch['encoder_input_tokens']}
  decodes = [np.asarray(model.predict_batch(p, inputs, max_decode_length=6))
             for model, p in ((per_layer, params), (scanned, stacked))]
  np.testing.assert_array_equal(decodes[0], decodes[1])
