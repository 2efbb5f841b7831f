"""Training and checkpoints on 8 simulated devices under different meshes and rules.

Collected only inside tests/test_multidevice.py's subprocess, where
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5train import checkpoints, optimizers, partitioning, testing
from t5train import train_state as train_state_lib
from t5train.errors import UserError

rules = partitioning.standard_logical_axis_rules
# name -> (num_partitions, rules); the first is the reference.
LAYOUTS = {
    'data8': (1, rules()),
    'data4_model2': (2, rules()),
    'data2_model4': (4, rules()),
    'data8_2d_params': (1, rules(parameter_partitioning_dims=2)),
    'data4_model2_2d_params_2d_activations': (2, rules(activation_partitioning_dims=2,
                                                       parameter_partitioning_dims=2)),
}
NUM_STEPS = 3


def test_eight_devices():
  assert jax.device_count() == 8


def make_model():
  # 4 heads so that the relative-position bias splits over 4 model partitions; Adafactor
  # factors every matrix of this size, so its factored moments are sharded too.
  return testing.tiny_model(testing.tiny_config(num_heads=4, head_dim=4),
                            optimizers.Adafactor(min_dim_size_to_factor=8))


def batches():
  return [testing.random_batch(batch_size=8, seed=seed) for seed in range(NUM_STEPS)]


def initializer_for(model, partitioner):
  return train_state_lib.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, testing.input_shapes(batches()[0]),
      partitioner=partitioner)


def train(num_partitions, logical_axis_rules):
  model = make_model()
  partitioner = partitioning.PjitPartitioner(num_partitions=num_partitions,
                                             logical_axis_rules=logical_axis_rules)
  trainer = testing.tiny_trainer(model, batches()[0], lambda step: 1e-2,
                                 partitioner=partitioner).trainer
  losses = [float(trainer.train_step(batch)['loss'].compute()) for batch in batches()]
  return losses, trainer.train_state, partitioner


@pytest.fixture(scope='module')
def runs():
  return {name: train(*layout) for name, layout in LAYOUTS.items()}


def leaf(tree, path):
  for key in path.split('/'):
    tree = tree[key]
  return tree


@pytest.mark.parametrize('name', list(LAYOUTS)[1:])
def test_every_layout_trains_like_pure_data_parallelism(runs, name):
  reference_losses, reference_state, _ = runs['data8']
  losses, state, _ = runs[name]
  assert losses[0] > losses[-1]  # it learns something
  testing.assert_trees_close(losses, reference_losses)
  testing.assert_trees_close(state.params, reference_state.params)


# (layout, parameter path) -> mesh axes the rules give it.
EXPECTED_PARAM_SPECS = {
    ('data8', 'encoder/layers_0/mlp/wi_0/kernel'): P(None, 'model'),
    ('data2_model4', 'encoder/layers_0/mlp/wi_0/kernel'): P(None, 'model'),
    ('data2_model4', 'encoder/layers_0/attention/out/kernel'): P('model', None),
    ('data2_model4', 'encoder/relpos_bias/rel_embedding'): P('model', None),
    ('data8_2d_params', 'token_embedder/embedding'): P('model', 'data'),
    ('data8_2d_params', 'encoder/layers_0/mlp/wi_0/kernel'): P('data', 'model'),
    ('data4_model2_2d_params_2d_activations', 'decoder/layers_1/mlp/wo/kernel'): P('model', 'data'),
}


@pytest.mark.parametrize('layout,path', list(EXPECTED_PARAM_SPECS))
def test_parameters_are_sharded_as_the_rules_say(runs, layout, path):
  _, state, partitioner = runs[layout]
  array = leaf(state.params, path)
  spec = EXPECTED_PARAM_SPECS[layout, path]
  assert array.sharding.spec == spec
  mesh = dict(partitioner.mesh.shape)
  expected_shard = tuple(size // (mesh[axis] if axis else 1)
                         for size, axis in zip(array.shape, tuple(spec) + (None,) * array.ndim))
  assert {shard.data.shape for shard in array.addressable_shards} == {expected_shard}
  assert len(array.addressable_shards) == 8


def test_factored_adafactor_moments_follow_their_parameter(runs):
  _, state, _ = runs['data4_model2_2d_params_2d_activations']
  factored = state.opt_state[0]  # optax's FactoredState: v_row, v_col per parameter
  kernel = 'encoder/layers_0/mlp/wi_0/kernel'  # ('embed', 'mlp') -> ('data', 'model')
  assert leaf(factored.v_row, kernel).sharding.spec == P('data')  # mlp reduced away
  assert leaf(factored.v_col, kernel).sharding.spec == P('model')  # embed reduced away
  assert leaf(factored.v_row, kernel).addressable_shards[0].data.shape == (4,)


def test_checkpoint_restores_under_other_meshes(runs, tmp_path):
  _, state, _ = runs['data8']
  model = make_model()
  layouts = [partitioning.PjitPartitioner(num_partitions=1),
             partitioning.PjitPartitioner(num_partitions=4),
             partitioning.PjitPartitioner(num_partitions=1, devices=jax.devices()[:1])]
  expected = jax.device_get(state)
  for index, partitioner in enumerate(layouts):
    initializer = initializer_for(model, partitioner)
    manager = checkpoints.CheckpointManager(
        str(tmp_path / f'run{index}'), checkpoints.SaveCheckpointConfig(period=1),
        initializer.train_state_shardings, initializer.global_train_state_shape)
    if index:  # restore what the previous layout saved, then save it again from this one
      previous = checkpoints.CheckpointManager(
          str(tmp_path / f'run{index - 1}'), checkpoints.SaveCheckpointConfig(period=1),
          initializer.train_state_shardings, initializer.global_train_state_shape)
      state = previous.restore()
      previous.close()
    for restored_leaf, sharding in zip(jax.tree_util.tree_leaves(state),
                                       jax.tree_util.tree_leaves(initializer.train_state_shardings)):
      assert restored_leaf.sharding.is_equivalent_to(sharding, restored_leaf.ndim)
    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(state)),
                         jax.tree_util.tree_leaves(expected)):
      np.testing.assert_array_equal(got, want)
    manager.save(state, force=True)
    manager.wait_until_finished()
    manager.close()
  assert len(state.params['encoder']['layers_0']['mlp']['wi_0']['kernel'].sharding.device_set) == 1


def test_bad_layouts_are_user_errors():
  with pytest.raises(UserError, match=r'number of devices \(8\) must be a multiple of .* \(3\)'):
    partitioning.PjitPartitioner(num_partitions=3).validate()
  with pytest.raises(UserError, match='BATCH_SIZE 10 is not divisible by the 4 data-parallel'):
    partitioning.PjitPartitioner(num_partitions=2).get_data_layout(10)
  with pytest.raises(UserError, match='only one of'):
    partitioning.PjitPartitioner(num_partitions=2, model_parallel_submesh=(2, 1, 1, 1))
  model = make_model()
  with pytest.raises(UserError, match=r'relpos_bias/rel_embedding has size 4 .* 8 equal parts'):
    initializer_for(model, partitioning.PjitPartitioner(num_partitions=8))


def test_data_layout_of_a_single_host():
  partitioner = partitioning.PjitPartitioner(model_parallel_submesh=(2, 1, 1, 1))
  assert dict(partitioner.mesh.shape) == {'data': 4, 'model': 2}
  layout = partitioner.get_data_layout(16)
  assert (layout.shard_id, layout.num_shards, layout.per_host_batch_size) == (0, 1, 16)
  assert layout.is_first_host_in_replica_set


def test_sharded_decoding_and_scoring_equal_one_device(runs):
  from t5train import decoding, inference  # noqa: PLC0415
  _, state, _ = runs['data8']
  params = jax.device_get(state.params)
  examples = [{'inputs': np.arange(2, 2 + n) % 60 + 2, 'targets': np.arange(3, 3 + n // 2) + 1}
              for n in range(3, 14)]  # 11 examples: the last batch of 8 is partly filler
  features = [testing.tiny_model().example_features(ex, {'inputs': 12, 'targets': 8})
              for ex in examples]
  outputs = []
  for partitioner in (partitioning.PjitPartitioner(num_partitions=2),
                      partitioning.PjitPartitioner(devices=jax.devices()[:1])):
    model = testing.tiny_model(testing.tiny_config(num_heads=4, head_dim=4),
                               decode_fn=decoding.beam_search)
    initializer = initializer_for(model, partitioner)
    sharded = jax.device_put(params, initializer.train_state_shardings.params)
    runner = inference.InferenceRunner(model, partitioner, initializer.train_state_shardings.params,
                                       batch_size=8, max_decode_length=8)
    tokens, scores = runner.predict(sharded, features)
    outputs.append((np.stack(tokens), np.asarray(scores), np.asarray(runner.score(sharded, features))))
  (tokens, scores, score), (one_tokens, one_scores, one_score) = outputs
  assert tokens.shape == (11, 8)
  np.testing.assert_array_equal(tokens, one_tokens)
  testing.assert_trees_close((scores, score), (one_scores, one_score))


def _trains_alike_under_model_parallelism(model, steps):
  """The model trains on ``steps`` (batches of 8) as pure data parallelism does under model
  parallelism with 2-D parameter and activation sharding."""
  results = []
  for name in ('data8', 'data4_model2_2d_params_2d_activations'):
    num_partitions, logical_axis_rules = LAYOUTS[name]
    partitioner = partitioning.PjitPartitioner(num_partitions=num_partitions,
                                               logical_axis_rules=logical_axis_rules)
    trainer = testing.tiny_trainer(model, steps[0], lambda step: 1e-2,
                                   partitioner=partitioner).trainer
    losses = [float(trainer.train_step(b)['loss'].compute()) for b in steps]
    results.append((losses, jax.device_get(trainer.train_state.params)))
  assert results[0][0][0] > results[0][0][-1]
  testing.assert_trees_close(results[1][0], results[0][0])
  testing.assert_trees_close(results[1][1], results[0][1])


def test_a_prefix_lm_trains_alike_under_every_partitioning():
  """The decoder-only model's parameters and activations follow the same rules."""
  model = testing.tiny_decoder_only_model(
      testing.tiny_config(num_heads=4, head_dim=4, num_encoder_layers=0),
      optimizers.Adafactor(min_dim_size_to_factor=8))
  rng = np.random.default_rng(0)
  lengths = {'inputs': 12, 'targets': 8}

  def batch():
    rows = [model.example_features({'inputs': rng.integers(2, 64, rng.integers(3, 12)),
                                    'targets': rng.integers(2, 64, rng.integers(2, 8))}, lengths)
            for _ in range(8)]
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

  _trains_alike_under_model_parallelism(model, [batch() for _ in range(NUM_STEPS)])


def test_lora_trains_alike_under_every_partitioning():
  """Adapters are sharded by their kernel's axes; the frozen base is never updated."""
  from t5train import network  # noqa: PLC0415
  config = testing.tiny_config(num_heads=4, head_dim=4, lora=network.LoraConfig(rank=4))
  model = testing.tiny_model(config, optimizers.MultiOptimizer(
      [(r'.*/lora_[ab]', optimizers.AdamW())]))
  _trains_alike_under_model_parallelism(model, batches())
