"""The seqio adapter: datasets for a task or mixture, batched and turned into global jax.Arrays.

The only service module that imports TensorFlow and seqio (both are slow to
import and absent on some accelerator images).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from t5train import tasks  # noqa: E402  (registers the built-in tasks)
from t5train.errors import UserError  # noqa: E402

# TensorFlow only feeds data; leave every accelerator to JAX.
tf.config.set_visible_devices([], 'GPU')

Batch = dict[str, np.ndarray]


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


def get_dataset(config: DatasetConfig, feature_converter_cls: type, num_epochs: int | None = None,
                shard_id: int = 0, num_shards: int = 1) -> tf.data.Dataset:
  """This host's share of the batched, feature-converted dataset."""
  task = task_for(config)
  if config.batch_size % num_shards:
    raise UserError(f'BATCH_SIZE {config.batch_size} is not divisible by the {num_shards} data '
                    'shards (hosts)')
  if config.split not in task.splits:
    raise UserError(f'{config.mixture_or_task_name!r} has no split {config.split!r}; '
                    f'it has {sorted(task.splits)}')
  return seqio.get_dataset(
      task, dict(config.task_feature_lengths), feature_converter_cls(pack=config.pack),
      dataset_split=config.split, use_cached=config.use_cached, shuffle=config.shuffle,
      num_epochs=num_epochs, shard_info=seqio.ShardInfo(shard_id, num_shards),
      seed=config.seed, batch_size=config.batch_size // num_shards)


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
    local = next(self.iterator)
    return {name: jax.make_array_from_process_local_data(
                self._sharding, value.numpy(), (self._global_batch_size,) + tuple(value.shape[1:]))
            for name, value in local.items()}


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
  if config.split not in task.splits:
    raise UserError(f'{config.mixture_or_task_name!r} has no split {config.split!r}; '
                    f'it has {sorted(task.splits)}')
  dataset = task.get_dataset(dict(config.task_feature_lengths), split=config.split,
                             shuffle=False, num_epochs=1, use_cached=config.use_cached)
  if num_examples is not None:
    dataset = dataset.take(num_examples)
  return list(dataset.as_numpy_iterator())


def _file_records(path: str) -> list[tuple[str, str | None]]:
  """(input, target or None) per record of a .txt (a line each), .tsv or .jsonl file."""
  records = []
  with tf.io.gfile.GFile(path) as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      if path.endswith('.jsonl'):
        try:
          record = json.loads(line)
          records.append((str(record['inputs']), record.get('targets')))
        except (ValueError, KeyError, TypeError) as e:
          raise UserError(f'{path}:{number}: expected a JSON object with "inputs" ({e})') from e
      elif path.endswith('.tsv'):
        fields = line.split('\t')
        records.append((fields[0], fields[1] if len(fields) > 1 else None))
      else:
        records.append((line, None))
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
  for inputs, targets in _file_records(path)[:num_examples]:
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
