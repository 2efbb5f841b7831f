"""The first half of T5X's training notebook, cell by cell, with t5train in place of t5x.

Only the imports and the remote paths differ from the seed notebook: a tiny model, the byte
vocabulary and a local output directory.
"""

import functools
import os
from collections.abc import Sequence

import clu.data
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from jax import random
from jax.experimental import multihost_utils

from t5train import adafactor, decoding, models, network, partitioning, utils
from t5train import trainer as trainer_lib

# The notebook's eight question / answer pairs; the replay below trains on the first four.
QA_PAIRS = [
    {'target': b'Ajay Tyagi',
     'input': b'nq question: who has been appointed as the new chairman of sebi'},
    {'target': b'C. S. Lewis',
     'input': b'nq question: who wrote the book lion the witch and the wardrobe'},
    {'target': b'29', 'input': b'nq question: how many planes did japan lose at pearl harbor'},
    {'target': b'Jack Keil', 'input': b'nq question: who does the voice of mcgruff the dog'},
    {'target': b'Journey', 'input': b'nq question: who sings the wheels in the sky keep on turning'},
    {'target': b'Kumiko Watanabe',
     'input': b'nq question: who voices regina in glitter force doki doki'},
    {'target': b'during World War II',
     'input': b'nq question: when did the us become allies with britain'},
    {'target': b'the United States', 'input': b'nq question: who won the rugby 7 in las vegas'},
]
EXAMPLES = QA_PAIRS[:4]
TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}
BATCH_SIZE = 4


def build_model():
  # As the notebook's T5 1.1 cell, at the size of tiny.gin and with a byte vocabulary.
  t5_config = network.T5Config(
      vocab_size=384, dtype='float32', emb_dim=32, num_heads=4, num_encoder_layers=2,
      num_decoder_layers=2, head_dim=8, mlp_dim=64, mlp_activations=('gelu', 'linear'),
      dropout_rate=0.0, logits_via_embedding=False)
  module = network.Transformer(config=t5_config)
  return models.EncoderDecoderModel(
      module=module, input_vocabulary=seqio.ByteVocabulary(),
      output_vocabulary=seqio.ByteVocabulary(),
      optimizer_def=adafactor.Adafactor(decay_rate=0.8, step_offset=0),
      decode_fn=functools.partial(decoding.temperature_sample, temperature=1.0, topk=40))


def train_iterator(model):
  features = {name: seqio.Feature(vocabulary=model.input_vocabulary, add_eos=True)
              for name in ('inputs', 'targets')}
  dataset = tf.data.Dataset.from_tensor_slices({
      'inputs': [ex['input'] for ex in EXAMPLES], 'targets': [ex['target'] for ex in EXAMPLES]})
  dataset = seqio.preprocessors.tokenize(dataset, features)
  dataset = seqio.preprocessors.append_eos(dataset, features)
  dataset = model.FEATURE_CONVERTER_CLS(pack=False)(
      dataset, task_feature_lengths=TASK_FEATURE_LENGTHS)
  dataset = dataset.padded_batch(BATCH_SIZE, drop_remainder=True).repeat()
  return clu.data.dataset_iterator.TfDatasetIterator(dataset, checkpoint=False)


def setup(output_dir, checkpoint_path=None, restore_mode='specific'):
  """The notebook's cells from RNGs to the Trainer."""
  model = build_model()
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  input_shapes = {'encoder_input_tokens': (BATCH_SIZE, TASK_FEATURE_LENGTHS['inputs']),
                  'decoder_target_tokens': (BATCH_SIZE, TASK_FEATURE_LENGTHS['targets']),
                  'decoder_input_tokens': (BATCH_SIZE, TASK_FEATURE_LENGTHS['targets']),
                  'decoder_loss_weights': (BATCH_SIZE, TASK_FEATURE_LENGTHS['targets'])}
  random_seed = multihost_utils.broadcast_one_to_all(np.int32(42))
  rng = random.PRNGKey(random_seed)
  init_rng, trainer_rng = random.split(rng, 2)

  if partitioner._model_parallel_submesh:
    num_partitions = np.prod(partitioner._model_parallel_submesh)
  else:
    num_partitions = partitioner._num_partitions
  assert jax.device_count() % num_partitions == 0

  save_checkpoint_cfg = utils.SaveCheckpointConfig(dtype='float32', keep=5, save_dataset=False)
  restore_checkpoint_cfg = utils.RestoreCheckpointConfig(dtype='float32', mode=restore_mode,
                                                         path=checkpoint_path)
  train_state_initializer = utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes=input_shapes, input_types=None, partitioner=partitioner)
  checkpoint_manager = utils.LegacyCheckpointManager(
      save_cfg=save_checkpoint_cfg, restore_cfg=restore_checkpoint_cfg,
      train_state_shape=train_state_initializer.global_train_state_shape,
      partitioner=partitioner, ds_iter=None, model_dir=output_dir)

  def get_state(rng):
    return train_state_initializer.from_scratch(rng).state_dict()

  train_state = checkpoint_manager.restore(
      [restore_checkpoint_cfg.path], restore_checkpoint_cfg,
      utils.get_fallback_state(restore_checkpoint_cfg, get_state, init_rng))
  if train_state is None:
    train_state = train_state_initializer.from_scratch(init_rng)
  assert not isinstance(train_state, Sequence)
  train_state_axes = train_state_initializer.train_state_axes
  utils.log_model_info(os.path.join(output_dir, 'model-info.txt'),
                       train_state_initializer.global_train_state_shape, partitioner)
  trainer = trainer_lib.Trainer(
      model=model, train_state=train_state, partitioner=partitioner, eval_names=[],
      summary_dir=output_dir, train_state_axes=train_state_axes, rng=trainer_rng,
      learning_rate_fn=utils.create_learning_rate_scheduler(), num_microbatches=None)
  return trainer, train_state, checkpoint_manager, save_checkpoint_cfg, model


def train_step(trainer, train_state, train_iter, checkpoint_manager, save_checkpoint_cfg):
  """The notebook's helper, unchanged."""
  if trainer.stop_training:
    return None
  try:
    first_step = int(utils.get_local_data(train_state.step))
    train_summary = trainer.train(train_iter, 1, start_step=first_step)
  except trainer_lib.PreemptionError:
    checkpoint_manager.save(trainer.train_state, save_checkpoint_cfg.state_transformation_fns)
    raise
  checkpoint_manager.save(trainer.train_state, save_checkpoint_cfg.state_transformation_fns)
  multihost_utils.sync_global_devices('complete')
  return trainer.train_state, train_summary.result()


def test_the_notebook_trains_saves_and_restores(tmp_path):
  output_dir = str(tmp_path)
  trainer, train_state, manager, save_cfg, model = setup(output_dir)
  assert int(train_state.step) == 0
  assert set(train_state.state_dict()) == {'step', 'params', 'opt_state'}
  train_iter = train_iterator(model)
  losses = []
  for _ in range(3):
    train_state, summary = train_step(trainer, train_state, train_iter, manager, save_cfg)
    losses.append(summary['loss'])
  assert int(train_state.step) == 3
  assert all(np.isfinite(losses))
  assert os.path.isdir(tmp_path / 'checkpoint_3')
  info = (tmp_path / 'model-info.txt').read_text()
  assert 'encoder/layers_0/mlp/wi_0/kernel' in info

  # A second setup pointed at the output directory restores the newest checkpoint exactly.
  restored = setup(output_dir, checkpoint_path=output_dir, restore_mode='latest')[1]
  assert int(restored.step) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, train_state.params)


def test_nothing_to_restore_and_a_missing_checkpoint(tmp_path):
  cfg = utils.RestoreCheckpointConfig(path=str(tmp_path / 'missing'), mode='specific')
  assert utils.get_fallback_state(cfg, lambda rng: {'x': 1}, random.PRNGKey(0)) is None
  fallback = utils.RestoreCheckpointConfig(path=str(tmp_path / 'missing'),
                                           fallback_to_scratch=True)
  assert utils.get_fallback_state(fallback, lambda rng: {'x': 1}, random.PRNGKey(0)) == {'x': 1}
  with pytest.raises(Exception, match='does not exist'):
    setup(str(tmp_path / 'out'), checkpoint_path=str(tmp_path / 'missing'))
