"""Orbax checkpoints: keep policy, exact restore, and a clear error for a checkpoint of another model."""

import jax
import numpy as np
import pytest

from t5train import checkpoints, partitioning, testing, train_state
from t5train.errors import UserError


def _initializer(config=None):
  model = testing.tiny_model(config)
  batch = testing.random_batch()
  return train_state.TrainStateInitializer(model.optimizer_def, model.get_initial_variables,
                                           testing.input_shapes(batch),
                                           partitioner=partitioning.PjitPartitioner())


def _manager(directory, initializer, **save):
  config = checkpoints.SaveCheckpointConfig(use_async=False, **save)
  return checkpoints.CheckpointManager(str(directory), config, initializer.train_state_shardings,
                                       initializer.global_train_state_shape)


def test_keeps_the_newest_and_restores_exactly(tmp_path):
  initializer = _initializer()
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  manager = _manager(tmp_path, initializer, period=2, keep=2)
  for step in range(1, 7):
    state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    if manager.should_save(step):
      manager.save(state)
  manager.wait_until_finished()
  manager.close()
  assert manager.all_steps() == [4, 6]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint_4', 'checkpoint_6']

  reader = _manager(tmp_path, initializer, period=2, keep=2)
  restored = reader.restore()
  reader.close()
  assert int(restored.step) == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
  leaf = jax.tree_util.tree_leaves(restored.params)[0]
  assert leaf.sharding == jax.tree_util.tree_leaves(initializer.train_state_shardings.params)[0]


def test_empty_directory_restores_nothing(tmp_path):
  manager = _manager(tmp_path, _initializer())
  assert manager.restore() is None
  manager.close()


def test_checkpoint_of_another_model_is_a_user_error(tmp_path):
  small = _initializer()
  manager = _manager(tmp_path, small, period=1)
  manager.save(small.from_scratch(jax.random.PRNGKey(0)))
  manager.wait_until_finished()
  manager.close()
  wider = _initializer(testing.tiny_config(emb_dim=32))
  reader = _manager(tmp_path, wider)
  with pytest.raises(UserError, match='does not match this model'):
    reader.restore()
  reader.close()
  with pytest.raises(UserError, match=r'parameter decoder/decoder_norm/scale has shape \(16,\) but '
                     r'the model expects \(32,\)'):
    checkpoints.restore_from_path(str(tmp_path / 'checkpoint_0'), wider)


def test_params_only_checkpoint_restores_params_and_starts_the_optimizer_fresh(tmp_path):
  initializer = _initializer()
  trained = initializer.from_scratch(jax.random.PRNGKey(3))
  params = jax.tree_util.tree_map(np.asarray, trained.params)
  checkpoints.save_params(str(tmp_path), params, step=7)
  restored = checkpoints.restore_from_path(str(tmp_path / 'checkpoint_7'), initializer)
  assert int(restored.step) == 7
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, params)
  fresh = initializer.from_scratch(jax.random.PRNGKey(3)).opt_state
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, fresh)
