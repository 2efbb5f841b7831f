"""The seqio adapter: datasets for a task or mixture, batched and turned into global jax.Arrays.

The only service module that imports TensorFlow and seqio (both are slow to
import and absent on some accelerator images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf

from t5train import file_formats, file_tasks, tasks  # (tasks registers built-ins)
from t5train.errors import UserError
from t5train.file_formats import Columns

# TensorFlow only feeds data; leave every accelerator to JAX.
tf.config.set_visible_devices([], 'GPU')

Batch = dict[str, np.ndarray]
_PREFETCH_BATCHES = 2  # made ahead of the loop; held in iterator checkpoints, so resumes are exact


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which data to read and how (T5X's field names)."""

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = 'train'
  batch_size: int = 32  # global, over all hosts
  shuffle: bool = True
  seed: int | None = None
  use_cached: bool = False
  pack: bool = False
  module: str | None = None  # imported first; it may register more tasks


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture, or a UserError that lists what is registered."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    shown = ', '.join(known[:20]) + (', ...' if len(known) > 20 else '')
    raise UserError(f'unknown task or mixture {name!r}; registered: {shown}. Register yours in a '
                    'module and import it from a gin file') from None


def task_for(config: DatasetConfig) -> seqio.Task | seqio.Mixture:
  """The task or mixture of ``config``, after importing the module that registers it."""
  if config.module:
    try:
      importlib.import_module(config.module)
    except ImportError as e:
      raise UserError(f'cannot import task module {config.module!r}: {e}') from e
  return get_mixture_or_task(config.mixture_or_task_name)


def check_split(config: DatasetConfig, task: seqio.Task | seqio.Mixture | None = None) -> None:
  """A UserError unless the task or mixture of ``config`` has ``config.split``."""
  task = task or task_for(config)
  if config.split not in task.splits:
    files_hint = (' (file tasks: set TRAIN_FILES / VALIDATION_FILES)'
                  if config.split in (file_tasks.TRAIN, file_tasks.VALIDATION) else '')
    raise UserError(f'{config.mixture_or_task_name!r} has no split {config.split!r}; '
                    f'it has {sorted(task.splits)}{files_hint}')


def check_features(config: DatasetConfig, feature_converter_cls: type,
                   task: seqio.Task | seqio.Mixture | None = None) -> None:
  """A UserError unless the feature converter reads every feature it needs from the task and
  drops none of its inputs (a model of the wrong kind for the task)."""
  task = task or task_for(config)
  converter = f'seqio.{feature_converter_cls.__name__}'
  have = set(task.output_features)
  if issubclass(feature_converter_cls, seqio.DecoderFeatureConverter):
    reads = {'targets'} | (set(config.task_feature_lengths) & {'inputs'})
  else:
    reads = set(feature_converter_cls.TASK_FEATURES)
  described = f'{converter} reads {sorted(reads)} and {config.mixture_or_task_name!r} has ' \
              f'{sorted(have)}'
  if reads - have:
    hint = (': a targets-only task trains a decoder-only model (gin/models/decoder_only/)'
            if reads - have == {'inputs'} else '')
    raise UserError(f'{described}, without {sorted(reads - have)}{hint}')
  if 'inputs' in have and 'inputs' not in reads:
    hint = ("give TASK_FEATURE_LENGTHS an 'inputs' length to train a prefix LM"
            if issubclass(feature_converter_cls, seqio.DecoderFeatureConverter) else
            'use seqio.DecoderFeatureConverter to train a prefix LM on inputs and targets')
    raise UserError(f"{described}: its 'inputs' would be dropped; {hint}")


def get_dataset(config: DatasetConfig, feature_converter_cls: type, num_epochs: int | None = None,
                shard_id: int = 0, num_shards: int = 1) -> tf.data.Dataset:
  """This host's share of the batched, feature-converted dataset."""
  task = task_for(config)
  if config.batch_size % num_shards:
    raise UserError(f'BATCH_SIZE {config.batch_size} is not divisible by the {num_shards} data '
                    'shards (hosts)')
  check_split(config, task)
  check_features(config, feature_converter_cls, task)
  dataset = seqio.get_dataset(
      task, dict(config.task_feature_lengths), feature_converter_cls(pack=config.pack),
      dataset_split=config.split, use_cached=config.use_cached, shuffle=config.shuffle,
      num_epochs=num_epochs, shard_info=seqio.ShardInfo(shard_id, num_shards),
      seed=config.seed, batch_size=config.batch_size // num_shards)
  # Packing and batching the next batches while a step runs, not when the loop asks for one.
  dataset = dataset.prefetch(_PREFETCH_BATCHES)
  # The file tasks parse lines in Python (tf.py_function); parsing keeps no state, so a
  # checkpoint of the iterator (file positions, shuffle buffers) is complete without it.
  options = tf.data.Options()
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return dataset.with_options(options)


@contextlib.contextmanager
def record_errors_as_user_errors() -> Iterator[None]:
  """A bad record of a user's file, met while tf.data reads, becomes one ``path:line`` UserError."""
  try:
    yield
  except tf.errors.OpError as e:
    message = file_tasks.record_error_message(e)
    if message is None:
      raise
    raise UserError(message) from None


class BatchIterator:
  """Host-local batches of a tf.data dataset as global jax.Arrays of ``global_batch_size`` rows.

  ``iterator`` is the underlying tf.data iterator; its position (shuffle and
  prefetch buffers included) is what ``DatasetIteratorArgs`` saves and restores.
  """

  def __init__(self, dataset: tf.data.Dataset, sharding: jax.sharding.Sharding,
               global_batch_size: int):
    self.iterator = iter(dataset)
    self._sharding = sharding
    self._global_batch_size = global_batch_size

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict[str, jax.Array]:
    with record_errors_as_user_errors():
      local = next(self.iterator)
    return {name: jax.make_array_from_process_local_data(
                self._sharding, value.numpy(), (self._global_batch_size,) + tuple(value.shape[1:]))
            for name, value in local.items()}


def data_scalars() -> dict[str, float]:
  """Counters of the input pipeline for TensorBoard: records skipped as bad, by split."""
  return {f'data/skipped_records/{split}': float(count)
          for split, count in file_tasks.skipped_records().items()}


def _iterator_file(directory: Any) -> str:
  """This process's file in a checkpoint's dataset item: one per process, as T5X does."""
  return os.path.join(str(directory), f'process_{jax.process_index()}-of-{jax.process_count()}')


def has_saved_iterator(item_dir: str) -> bool:
  """Whether ``item_dir`` (a checkpoint's dataset item) holds this process's iterator."""
  return tf.io.gfile.exists(_iterator_file(item_dir) + '.index')


class DatasetIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores each process's tf.data iterator as a TensorFlow checkpoint file."""

  def save(self, directory: Any, args: 'DatasetIteratorArgs') -> None:
    tf.train.Checkpoint(iterator=args.iterator).write(_iterator_file(directory))

  def restore(self, directory: Any, args: 'DatasetIteratorArgs') -> Any:
    path = _iterator_file(directory)
    if not tf.io.gfile.exists(path + '.index'):
      raise UserError(f'{directory} has no data iterator for process {jax.process_index()} of '
                      f'{jax.process_count()}')
    tf.train.Checkpoint(iterator=args.iterator).read(path).assert_consumed()
    return args.iterator


@ocp.args.register_with_handler(DatasetIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DatasetIteratorArgs(ocp.args.CheckpointArgs):
  """Orbax arguments for the data iterator item of a checkpoint."""

  iterator: Any


def subtask_names(config: DatasetConfig) -> list[str]:
  """The tasks that make up ``config``'s mixture (or the task itself), in seqio's order."""
  return [task.name for task in seqio.get_subtasks(task_for(config))]


def pretokenized_examples(config: DatasetConfig, num_examples: int | None = None
                          ) -> list[dict[str, Any]]:
  """The first examples of a split (all with None), unbatched and unconverted (text and ids)."""
  task = task_for(config)
  check_split(config, task)
  dataset = task.get_dataset(dict(config.task_feature_lengths), split=config.split,
                             shuffle=False, num_epochs=1, use_cached=config.use_cached)
  if num_examples is not None:
    dataset = dataset.take(num_examples)
  with record_errors_as_user_errors():
    return list(dataset.as_numpy_iterator())


def _file_records(path: str) -> list[tuple[str, str | None]]:
  """(input, target or None) per non-blank line of a data file (formats as in file_formats).

  Text files hold an input per line; JSONL files "inputs" and optionally "targets"; TSV and
  CSV files the input and optionally the target in their first two columns.
  """
  fmt = file_formats.file_format(path)
  records = []
  with tf.io.gfile.GFile(path, 'rb') as f:
    for number, raw in enumerate(file_formats.open_lines(f, path), start=1):
      if not raw.strip():
        continue
      if fmt == file_formats.TEXT:
        records.append((file_formats.parse_line(raw, path, number, fmt, Columns(()))[0], None))
        continue
      both = Columns((file_formats.DEFAULT_INPUT_FIELD, file_formats.DEFAULT_TARGET_FIELD)
                     if fmt == file_formats.JSONL else (0, 1))
      try:
        records.append(file_formats.parse_line(raw, path, number, fmt, both))
      except file_formats.RecordError:  # no target: an input alone
        one = Columns(both.fields[:1])
        records.append((file_formats.parse_line(raw, path, number, fmt, one)[0], None))
  return records


def file_examples(path: str, input_vocabulary: seqio.Vocabulary,
                  output_vocabulary: seqio.Vocabulary, task_feature_lengths: Mapping[str, int],
                  num_examples: int | None = None) -> list[dict[str, Any]]:
  """Examples from a text file, tokenized as T5 tasks do: trimmed, then EOS appended.

  Each example has ``inputs`` and ``inputs_pretokenized`` and, where the file gives
  targets (.tsv second column, .jsonl "targets"), ``targets`` and ``targets_pretokenized``.
  """
  if not tf.io.gfile.exists(path):
    raise UserError(f'input file {path!r} does not exist')
  def encode(vocabulary: seqio.Vocabulary, text: str, length: int) -> np.ndarray:
    ids = list(vocabulary.encode(text))[:length - 1] + [vocabulary.eos_id]
    return np.asarray(ids, np.int32)
  examples = []
  try:
    records = _file_records(path)
  except file_formats.RecordError as e:
    raise UserError(str(e)) from None
  for inputs, targets in records[:num_examples]:
    example = {'inputs': encode(input_vocabulary, inputs, task_feature_lengths['inputs']),
               'inputs_pretokenized': inputs}
    if targets is not None:
      example['targets'] = encode(output_vocabulary, str(targets), task_feature_lengths['targets'])
      example['targets_pretokenized'] = str(targets)
    examples.append(example)
  if not examples:
    raise UserError(f'input file {path!r} holds no examples')
  return examples


__all__ = ['DatasetConfig', 'get_dataset', 'task_for', 'get_mixture_or_task',
           'BatchIterator', 'DatasetIteratorArgs', 'has_saved_iterator',
           'pretokenized_examples', 'subtask_names', 'file_examples', 'tasks']
