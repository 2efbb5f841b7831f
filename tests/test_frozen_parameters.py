"""MultiOptimizer: optimisers by parameter regex, and frozen parameters."""

import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from t5train import model_info, optimizers, testing
from t5train.errors import UserError

ENCODER_FROZEN = optimizers.MultiOptimizer([('decoder/.*', optimizers.AdamW())])


def _flat(tree):
  return {optimizers.param_path(path): np.asarray(x)
          for path, x in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _train(optimizer_def, steps=3):
  batch = testing.random_batch()
  parts = testing.tiny_trainer(testing.tiny_model(optimizer_def=optimizer_def), batch)
  before = _flat(parts.trainer.train_state.params)
  for _ in range(steps):
    parts.trainer.train_step(batch)
  return parts, before, _flat(parts.trainer.train_state.params)


@pytest.fixture(scope='module')
def encoder_frozen():
  return _train(ENCODER_FROZEN)


def test_frozen_parameters_stay_bit_identical_and_the_rest_trains(encoder_frozen):
  _, before, after = encoder_frozen
  for name in before:
    if name.startswith('decoder/'):
      assert not np.array_equal(after[name], before[name]), name
    else:  # the encoder and the shared embedding
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_frozen_parameters_have_no_optimizer_state(encoder_frozen):
  parts, before, _ = encoder_frozen
  state_size = sum(x.size for x in jax.tree_util.tree_leaves(parts.trainer.train_state.opt_state)
                   if hasattr(x, 'size') and x.ndim > 0)
  decoder_size = sum(x.size for name, x in before.items() if name.startswith('decoder/'))
  assert state_size == 2 * decoder_size  # AdamW's two moments, of the decoder only
  text = model_info.model_info_text(parts.initializer.global_train_state_shape,
                                    parts.initializer.train_state_logical_axes, parts.partitioner,
                                    ENCODER_FROZEN.trainable)
  frozen_section = text.split('# Frozen parameters')[1].split('Total frozen parameters')[0]
  assert 'encoder/layers_0/attention/query/kernel' in frozen_section
  assert 'decoder/layers_0' not in frozen_section


def test_one_pair_matching_everything_trains_as_its_optimizer():
  _, _, single = _train(optimizers.AdamW(), steps=2)
  _, _, multi = _train(optimizers.MultiOptimizer([('.*', optimizers.AdamW())]), steps=2)
  testing.assert_trees_equal(multi, single)


@pytest.mark.parametrize('regex, message', [
    ('decoder/layers_9/.*', "regex 'decoder/layers_9/.*' matches no parameter"),
    ('decoder/(', 'is not a regular expression'),
])
def test_a_regex_that_names_nothing_is_a_user_error(regex, message):
  with pytest.raises(UserError, match=re.escape(message)):
    multi = optimizers.MultiOptimizer([(regex, optimizers.AdamW())])
    testing.tiny_trainer(testing.tiny_model(optimizer_def=multi))


def _assert_same_state(a, b):
  testing.assert_trees_equal(jax.device_get(a.train_state.params),
                             jax.device_get(b.train_state.params))
  testing.assert_trees_equal(jax.device_get(a.train_state.opt_state),
                             jax.device_get(b.train_state.opt_state))


def test_a_run_with_frozen_parameters_resumes_exactly(tmp_path):
  """The masked optimizer state (no slots for frozen parameters) saves and restores: a resumed
  run takes the next step exactly as the uninterrupted one."""
  from t5train import checkpoints  # noqa: PLC0415
  model = testing.tiny_model(optimizer_def=ENCODER_FROZEN)
  batch = testing.random_batch()
  save_cfg = checkpoints.SaveCheckpointConfig(period=None, save_dataset=False, use_async=False)
  first = testing.tiny_trainer(model, batch, model_dir=str(tmp_path), save_cfg=save_cfg)
  for _ in range(2):
    first.trainer.train_step(batch)
  first.checkpoint_manager.save(first.trainer.train_state, force=True)
  first.checkpoint_manager.wait_until_finished()
  first.trainer.train_step(batch)
  resumed = testing.tiny_trainer(model, batch, model_dir=str(tmp_path), save_cfg=save_cfg)
  assert resumed.resumed and int(resumed.train_state.step) == 2
  resumed.trainer.train_step(batch)
  _assert_same_state(resumed, first)


def test_checkpoints_can_leave_the_frozen_parameters_to_the_base(tmp_path):
  """With save_frozen_params=False a checkpoint holds the trained parameters only and names the
  checkpoint the frozen ones came from; resuming from it (and saving again) is exact."""
  from t5train import checkpoint_reading, checkpoints  # noqa: PLC0415
  model = testing.tiny_model(optimizer_def=ENCODER_FROZEN)
  batch = testing.random_batch()
  base = checkpoints.save_params(str(tmp_path / 'base'), testing.tiny_trainer(model, batch)
                                 .train_state.params, 0)
  save_cfg = checkpoints.SaveCheckpointConfig(period=None, save_dataset=False, use_async=False,
                                              save_frozen_params=False)
  restore_cfg = checkpoints.RestoreCheckpointConfig(path=base, mode='specific')
  run = str(tmp_path / 'run')
  first = testing.tiny_trainer(model, batch, model_dir=run, save_cfg=save_cfg,
                               restore_cfg=restore_cfg)
  for _ in range(2):
    first.trainer.train_step(batch)
  first.checkpoint_manager.save(first.trainer.train_state, force=True)
  first.checkpoint_manager.wait_until_finished()
  first.trainer.train_step(batch)
  saved = checkpoints.checkpoint_dir(run, 2)
  names = [name for name, _ in checkpoint_reading.flatten_with_names(
      checkpoint_reading.saved_tree(checkpoint_reading.item_dir(saved))['params'])]
  assert names and all(name.startswith('decoder/') for name in names)
  assert checkpoint_reading.base_checkpoint(saved) == base

  resumed = testing.tiny_trainer(model, batch, model_dir=run, save_cfg=save_cfg,
                                 restore_cfg=restore_cfg)
  assert resumed.resumed and int(resumed.train_state.step) == 2
  resumed.trainer.train_step(batch)
  _assert_same_state(resumed, first)
  resumed.checkpoint_manager.save(resumed.trainer.train_state, force=True)
  resumed.close()
  assert checkpoint_reading.base_checkpoint(checkpoints.checkpoint_dir(run, 3)) == base
  initializer = resumed.initializer
  testing.assert_trees_equal(
      jax.device_get(checkpoint_reading.restore_params(checkpoints.checkpoint_dir(run, 3),
                                                       initializer)),
      jax.device_get(first.train_state.params))

  with pytest.raises(UserError, match='initialises them from scratch'):
    testing.tiny_trainer(model, batch, model_dir=str(tmp_path / 'scratch'), save_cfg=save_cfg)
