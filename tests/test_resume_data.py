"""Resuming with another batch size continues the data stream; other stream settings stop with
one line that names the setting which starts the data afresh (``restore_dataset=False``).

The decisions are checked in-process on the data functions (a stand-in for the checkpoint
manager saves each ``checkpoint_<step>/dataset`` item with the real handler); one test runs
the train binary through the same resumes.
"""

import dataclasses
import logging
import os
import types

import numpy as np
import pytest
import seqio
from binaries import SMOKE, call_configured, run_train

from t5train import checkpoints, data, partitioning, train
from t5train.errors import UserError

RUN = SMOKE + ['--gin.EVAL_PERIOD=0']
# The training stream of RUN (pretrain.gin + demo.gin, RANDOM_SEED 0) at BATCH_SIZE=8.
CONFIG = data.DatasetConfig('sort_digits', {'inputs': 32, 'targets': 32}, batch_size=8,
                            shuffle=True, seed=None, pack=True)
MODEL = types.SimpleNamespace(FEATURE_CONVERTER_CLS=seqio.EncDecFeatureConverter)


def stream_rows(count, seed=0):
  """The first ``count`` rows of CONFIG's stream, never interrupted, batch by batch."""
  dataset = data.get_dataset(dataclasses.replace(CONFIG, seed=seed), MODEL.FEATURE_CONVERTER_CLS)
  batches = list(dataset.take(count // CONFIG.batch_size).as_numpy_iterator())
  return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def assert_rows(batches, expected, start):
  """The rows of ``batches`` (dicts of arrays) are ``expected``'s from row ``start`` on."""
  rows = {name: np.concatenate([np.asarray(b[name]) for b in batches]) for name in batches[0]}
  assert sorted(rows) == sorted(expected)
  for name, values in rows.items():
    np.testing.assert_array_equal(values, expected[name][start:start + len(values)], err_msg=name)


class Manager:
  """What the data stream uses of checkpoints.CheckpointManager: the data item of
  ``checkpoint_<step>``, written and read with the real handler."""

  def __init__(self, directory, save_dataset=True):
    self.directory = directory
    self.save_config = checkpoints.SaveCheckpointConfig(save_dataset=save_dataset)
    self.items = {}

  def item_dir(self, step):
    return os.path.join(checkpoints.checkpoint_dir(self.directory, step), train.DATASET_ITEM)

  def add_item(self, name, args):
    self.items[name] = args

  def restore_item(self, step, name, args):
    data.DatasetIteratorHandler().restore(self.item_dir(step), args)
    return True

  def save(self, step, args=None):
    os.makedirs(self.item_dir(step), exist_ok=True)
    data.DatasetIteratorHandler().save(self.item_dir(step), args or self.items[train.DATASET_ITEM])


def start_and_read(manager, step, num_batches, batch_size=8, resumed=True, restore_dataset=True,
                   **settings):
  """Starts the stream as the train binary does at ``step`` and reads ``num_batches``."""
  config = dataclasses.replace(CONFIG, batch_size=batch_size, **settings)
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  start = train._data_start(MODEL, config, 0, partitioner, manager, step, resumed,
                            restore_dataset)
  batches = train._training_batches(MODEL, start, partitioner, manager, step)
  return start, [next(batches) for _ in range(num_batches)]


def test_resumes_continue_the_stream_or_stop_before_training(tmp_path):
  expected = stream_rows(96)
  manager = Manager(str(tmp_path))
  # 4 steps of 8 rows, saved at step 4.
  _, read = start_and_read(manager, 0, 4, resumed=False)
  assert_rows(read, expected, 0)
  manager.save(4)
  # Resumed with 16 rows a batch: the stream goes on at row 32.
  manager = Manager(str(tmp_path))
  start, read = start_and_read(manager, 4, 2, batch_size=16)
  assert not start.restore and start.position.start_row == 32
  assert_rows(read, expected, 32)
  manager.save(6)
  # The same batch size again: the iterator saved at step 6 is restored (rows 64 on).
  start, read = start_and_read(Manager(str(tmp_path)), 6, 2, batch_size=16)
  assert start.restore and start.position.rows == 64
  assert_rows(read, expected, 64)

  # Other stream settings stop, naming what differs and the setting that starts afresh.
  for settings, named in (({'task_feature_lengths': {'inputs': 16, 'targets': 16}},
                           "task_feature_lengths {'inputs': 32, 'targets': 32} then, "
                           "{'inputs': 16, 'targets': 16} now"),
                          ({'seed': 5}, 'seed 0 then, 5 now'),
                          ({'pack': False}, 'pack True then, False now')):
    with pytest.raises(UserError, match='restore_dataset=False') as raised:
      start_and_read(Manager(str(tmp_path)), 6, 0, batch_size=16, **settings)
    assert named in str(raised.value) and '\n' not in str(raised.value)
  # restore_dataset=False: a fresh stream, seeded with the seed plus the step.
  start = train._data_start(MODEL, dataclasses.replace(CONFIG, batch_size=16), 0,
                            partitioning.PjitPartitioner(num_partitions=1),
                            Manager(str(tmp_path)), 6, True, False)
  assert (start.restore, start.config.seed, start.position.start_row) == (False, 6, 0)

  # A checkpoint saved before data positions were recorded (an iterator alone) resumes as
  # before; with another batch size its iterator does not fit, and the error says so.
  os.remove(os.path.join(manager.item_dir(4), 'process_0-of-1.json'))
  assert data.saved_position(manager.item_dir(4)) is None
  start, read = start_and_read(Manager(str(tmp_path)), 4, 1)
  assert start.restore and start.position is None
  assert_rows(read, expected, 32)
  with pytest.raises(UserError, match=r'does not fit .*expected \[16,32\] but got \[8,32\].*'
                     'restore_dataset=False'):
    start_and_read(Manager(str(tmp_path)), 4, 0, batch_size=16)


def test_binary_resumes_with_another_batch_size_and_stops_on_other_lengths(tmp_path, caplog):
  """The train binary's function (in this process where no exit status is needed): 4 steps at
  batch 8, a resume at 16, then other lengths (the binary: exit 2), then restore_dataset=False."""
  model_dir = str(tmp_path)
  files = [f.split('=', 1)[1] for f in SMOKE]

  def train_in_process(*bindings):
    with caplog.at_level(logging.INFO):
      call_configured(train.train, files,
                      [f"MODEL_DIR = '{model_dir}'", 'EVAL_PERIOD = 0', *bindings])
    text, _ = caplog.text, caplog.clear()
    return text

  train_in_process('TRAIN_STEPS = 4', 'BATCH_SIZE = 8')
  assert 'the data continue at row 32' in train_in_process('TRAIN_STEPS = 6', 'BATCH_SIZE = 16')
  # Steps 5 and 6 read rows 32 to 63 of the stream: checkpoint_6's iterator gives rows 64 on.
  item_dir = os.path.join(model_dir, 'checkpoint_6', train.DATASET_ITEM)
  position = data.saved_position(item_dir)
  assert position == dataclasses.replace(data.DataPosition.of(
      dataclasses.replace(CONFIG, batch_size=16), MODEL.FEATURE_CONVERTER_CLS, seed=0,
      stream_seed=0, shard_id=0, num_shards=1, start_row=32), rows=64)
  iterator = iter(data.get_dataset(dataclasses.replace(CONFIG, batch_size=16, seed=0),
                                   MODEL.FEATURE_CONVERTER_CLS, skip_rows=position.start_row))
  data.DatasetIteratorHandler().restore(item_dir, data.DatasetIteratorArgs(iterator))
  assert_rows([{name: value.numpy() for name, value in next(iterator).items()}],
              stream_rows(80), 64)

  other_lengths = ["--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
                   '--gin.BATCH_SIZE=16', '--gin.TRAIN_STEPS=7']
  refused = run_train(*RUN, f"--gin.MODEL_DIR='{model_dir}'", *other_lengths)
  assert refused.returncode == 2, refused.stderr[-3000:]
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith('t5train.train: error: the data cannot continue where'), last
  assert 'task_feature_lengths' in last and 'restore_dataset=False' in last
  assert 'Traceback' not in refused.stderr and 'step 7/' not in refused.stderr
  afresh = train_in_process("TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}",
                            'BATCH_SIZE = 16', 'TRAIN_STEPS = 7',
                            'train_script.train.restore_dataset = False')
  assert 'the data stream starts afresh (seed 0 + step 6)' in afresh
  assert os.path.isdir(os.path.join(model_dir, 'checkpoint_7'))
