"""Orbax checkpoints: keep policy, exact restore, and a clear error for a checkpoint of another model."""

import gc
import sys
import time

import jax
import numpy as np
import pytest

from t5train import checkpoint_reading, checkpoints, optimizers, partitioning, testing, train_state
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


def test_keeps_the_newest_and_restores_exactly(tmp_path, caplog):
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
  with caplog.at_level('WARNING'):
    restored = reader.restore()
  reader.close()
  assert int(restored.step) == 6
  assert not [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']  # a clean restore
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
  manager.save(small.from_scratch(jax.random.PRNGKey(0)), force=True)
  manager.wait_until_finished()
  manager.close()
  wider = _initializer(testing.tiny_config(emb_dim=32))
  reader = _manager(tmp_path, wider)
  message = (r'checkpoint_0: parameter decoder/decoder_norm/scale has shape \(16,\) but the model '
             r'expects \(32,\)')
  with pytest.raises(UserError, match=message):
    reader.restore()
  reader.close()
  with pytest.raises(UserError, match=message):
    checkpoint_reading.restore_from_path(str(tmp_path / 'checkpoint_0'), wider)
  other_vocab = _initializer(testing.tiny_config(vocab_size=80))
  with pytest.raises(UserError, match=r"checkpoint_0: its vocabulary has 64 entries but the "
                     r"model's has 80 \(token_embedder/embedding\)"):
    checkpoint_reading.restore_from_path(str(tmp_path / 'checkpoint_0'), other_vocab)


def test_params_only_checkpoint_restores_params_and_starts_the_optimizer_fresh(tmp_path):
  initializer = _initializer()
  trained = initializer.from_scratch(jax.random.PRNGKey(3))
  params = jax.tree_util.tree_map(np.asarray, trained.params)
  checkpoints.save_params(str(tmp_path), params, step=7)
  restored = checkpoint_reading.restore_from_path(str(tmp_path / 'checkpoint_7'), initializer)
  assert int(restored.step) == 7
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, params)
  fresh = initializer.from_scratch(jax.random.PRNGKey(3)).opt_state
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, fresh)


def _save_steps(manager, initializer, steps):
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  for step in steps:
    state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    manager.save(state)
  manager.wait_until_finished()
  manager.close()
  return state


def test_keep_period_and_explicit_steps(tmp_path):
  initializer = _initializer()
  manager = _manager(tmp_path, initializer, period=2, keep=2, keep_period=4, steps=(3,))
  _save_steps(manager, initializer, range(1, 11))
  # Saved: 2, 3, 4, 6, 8, 10. Kept: the newest two (8, 10) and every multiple of 4 (4, 8).
  assert manager.all_steps() == [4, 8, 10]


def test_bfloat16_checkpoints_restore_into_float32(tmp_path):
  initializer = _initializer()
  manager = _manager(tmp_path, initializer, period=1, dtype='bfloat16')
  state = _save_steps(manager, initializer, [1])
  saved = checkpoint_reading.saved_tree(str(tmp_path / 'checkpoint_1' / 'state'))
  assert saved['params']['token_embedder']['embedding'].dtype == jax.numpy.bfloat16
  restored = _manager(tmp_path, initializer).restore()
  leaf = restored.params['token_embedder']['embedding']
  assert leaf.dtype == jax.numpy.float32
  expected = np.asarray(state.params['token_embedder']['embedding'])
  np.testing.assert_array_equal(np.asarray(leaf), expected.astype(jax.numpy.bfloat16).astype(np.float32))


def test_bad_policy_values_are_user_errors():
  with pytest.raises(UserError, match="dtype must be one of float32, bfloat16, not 'float16'"):
    checkpoints.SaveCheckpointConfig(dtype='float16')
  with pytest.raises(UserError, match='keep must be a positive number'):
    checkpoints.SaveCheckpointConfig(keep=0)


def test_assignment_map_renames_and_drops_parameters(tmp_path):
  initializer = _initializer()
  trained = initializer.from_scratch(jax.random.PRNGKey(3))
  params = jax.tree_util.tree_map(np.asarray, trained.params)
  # A checkpoint whose decoder layers are named `block_<i>` instead of `layers_<i>`.
  renamed = dict(params)
  renamed['decoder'] = {name.replace('layers_', 'block_'): value
                        for name, value in params['decoder'].items()}
  checkpoints.save_params(str(tmp_path), renamed, step=5)
  assignment_map = ((r'decoder/layers_(\d+)/(.*)', r'decoder/block_\1/\2'),
                    (r'.*relpos_bias.*', None))
  restored = checkpoint_reading.restore_from_path(str(tmp_path / 'checkpoint_5'), initializer,
                                           assignment_map, jax.random.PRNGKey(9))
  np.testing.assert_array_equal(restored.params['decoder']['layers_1']['mlp']['wo']['kernel'],
                                params['decoder']['layers_1']['mlp']['wo']['kernel'])
  fresh = initializer.from_scratch(jax.random.PRNGKey(9)).params
  np.testing.assert_array_equal(restored.params['encoder']['relpos_bias']['rel_embedding'],
                                fresh['encoder']['relpos_bias']['rel_embedding'])
  assert not np.array_equal(restored.params['encoder']['relpos_bias']['rel_embedding'],
                            params['encoder']['relpos_bias']['rel_embedding'])
  with pytest.raises(UserError, match='has no parameter decoder/layers_0'):
    checkpoint_reading.restore_from_path(str(tmp_path / 'checkpoint_5'), initializer)


def test_assignment_map_keeps_a_t5train_checkpoints_step(tmp_path):
  # finetune_lora.gin and finetune_prompt.gin restore through an assignment map: TRAIN_STEPS
  # counts from the initial checkpoint's step, as without a map (and as for T5X checkpoints).
  initializer = _initializer()
  params = jax.tree_util.tree_map(np.asarray, initializer.from_scratch(jax.random.PRNGKey(3)).params)
  checkpoints.save_params(str(tmp_path), params, step=20)
  restored = checkpoint_reading.restore_from_path(
      str(tmp_path / 'checkpoint_20'), initializer, ((r'.*relpos_bias.*', None),),
      jax.random.PRNGKey(9))
  assert int(restored.step) == 20
  assert restored.step.sharding == initializer.train_state_shardings.step


def _legacy_manager(initializer, config):
  from t5train import legacy_checkpoints
  return legacy_checkpoints.LegacyCheckpointManager(None, config,
                                                    initializer.global_train_state_shape)


def test_legacy_manager_applies_the_assignment_map(tmp_path):
  initializer = _initializer()
  params = jax.tree_util.tree_map(np.asarray, initializer.from_scratch(jax.random.PRNGKey(3)).params)
  renamed = dict(params)
  renamed['decoder'] = {name.replace('layers_', 'block_'): value
                        for name, value in params['decoder'].items()}
  path = checkpoints.save_params(str(tmp_path), renamed, step=7)
  config = checkpoints.RestoreCheckpointConfig(
      path=path, mode='specific',
      assignment_map=((r'decoder/layers_(\d+)/(.*)', r'decoder/block_\1/\2'),
                      (r'.*relpos_bias.*', None)))
  manager = _legacy_manager(initializer, config)
  with pytest.raises(UserError, match='pass fallback_state'):
    manager.restore([path], config)
  fallback = initializer.from_scratch(jax.random.PRNGKey(9)).state_dict()
  state = manager.restore([path], config, fallback)
  assert int(state.step) == 7
  np.testing.assert_array_equal(state.params['decoder']['layers_1']['mlp']['wo']['kernel'],
                                params['decoder']['layers_1']['mlp']['wo']['kernel'])
  np.testing.assert_array_equal(state.params['encoder']['relpos_bias']['rel_embedding'],
                                fallback['params']['encoder']['relpos_bias']['rel_embedding'])
  assert not np.array_equal(state.params['encoder']['relpos_bias']['rel_embedding'],
                            params['encoder']['relpos_bias']['rel_embedding'])


def test_legacy_manager_restores_every_checkpoint_in_mode_all(tmp_path):
  initializer = _initializer()
  manager = _manager(tmp_path, initializer, period=1)
  saved = _save_steps(manager, initializer, [1, 2])
  config = checkpoints.RestoreCheckpointConfig(path=str(tmp_path), mode='all')
  states = _legacy_manager(initializer, config).restore([str(tmp_path)], config)
  assert isinstance(states, list) and [int(state.step) for state in states] == [1, 2]
  jax.tree_util.tree_map(np.testing.assert_array_equal, states[-1].params, saved.params)
  latest = checkpoints.RestoreCheckpointConfig(path=str(tmp_path), mode='latest')
  assert int(_legacy_manager(initializer, latest).restore([str(tmp_path)], latest).step) == 2


def test_initial_checkpoint_fallback_and_the_warning_when_model_dir_wins(tmp_path, caplog):
  initializer = _initializer()
  rng = jax.random.PRNGKey(0)
  missing = checkpoints.RestoreCheckpointConfig(path=str(tmp_path / 'nope'), mode='specific')
  empty = _manager(tmp_path / 'run', initializer)
  with pytest.raises(UserError, match='does not exist'):
    checkpoints.restore_or_initialize(empty, initializer, missing, rng)
  fallback = checkpoints.RestoreCheckpointConfig(path=str(tmp_path / 'nope'),
                                                 fallback_to_scratch=True)
  state, resumed, _ = checkpoints.restore_or_initialize(empty, initializer, fallback, rng)
  assert not resumed and int(state.step) == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params,
                         initializer.from_scratch(rng).params)

  empty.save(state.replace(step=jax.numpy.asarray(3, jax.numpy.int32)), force=True)
  empty.wait_until_finished()
  with caplog.at_level('WARNING'):
    state, resumed, _ = checkpoints.restore_or_initialize(empty, initializer, missing, rng)
  empty.close()
  assert resumed and int(state.step) == 3
  assert f'{tmp_path / "run"} already has checkpoints' in caplog.text and 'IGNORED' in caplog.text


def test_an_initial_checkpoint_restores_the_optimizer_state_too(tmp_path):
  model = testing.tiny_model(optimizer_def=optimizers.Adafactor(min_dim_size_to_factor=8))
  initializer = train_state.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables,
      testing.input_shapes(testing.random_batch()), partitioner=partitioning.PjitPartitioner())
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  # Non-zero moments, so that a fresh optimizer state would differ.
  state = state.replace(step=jax.numpy.asarray(7, jax.numpy.int32), opt_state=jax.tree_util.tree_map(
      lambda x: x + 0.5 if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state.opt_state))
  manager = _manager(tmp_path, initializer, period=1)
  manager.save(state, force=True)
  manager.wait_until_finished()
  manager.close()
  restored = checkpoint_reading.restore_from_path(str(tmp_path / 'checkpoint_7'), initializer)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)


def test_a_damaged_checkpoint_fails_once_without_stray_tracebacks(tmp_path, monkeypatch):
  initializer = _initializer(testing.tiny_config(vocab_size=4096, emb_dim=64))
  manager = _manager(tmp_path, initializer)
  manager.save(initializer.from_scratch(jax.random.PRNGKey(0)).replace(step=jax.numpy.asarray(1)),
               force=True)
  manager.wait_until_finished()
  # Only files holding array data grow past 200 kB (the two 4096 x 64 tables are 1 MB each).
  data = [path for path in (tmp_path / 'checkpoint_1' / 'state').rglob('*')
          if path.is_file() and path.stat().st_size > 200_000]
  assert data
  for path in data:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  # The reads that the failed restore abandons finish later; Python would report each of them.
  reports = []
  monkeypatch.setattr(sys, 'unraisablehook', reports.append)
  for _ in range(3):
    with pytest.raises(UserError, match='checkpoint_1: .* cannot be read, so the checkpoint is damaged'):
      manager.restore()
  manager.close()
  time.sleep(0.5)
  gc.collect()
  assert reports == []
