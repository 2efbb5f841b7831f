"""The seqio adapter: datasets for a task or mixture, batched and turned into global jax.Arrays.

The only service module that imports TensorFlow and seqio (both are slow to
import and absent on some accelerator images).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import numpy as np  # noqa: E402
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


def global_batches(dataset: tf.data.Dataset, sharding: jax.sharding.Sharding,
                   global_batch_size: int) -> Iterator[dict[str, jax.Array]]:
  """Host-local numpy batches -> global jax.Arrays of ``global_batch_size`` rows."""
  for local in dataset.as_numpy_iterator():
    yield {name: jax.make_array_from_process_local_data(
               sharding, np.asarray(value), (global_batch_size,) + value.shape[1:])
           for name, value in local.items()}


def pretokenized_examples(config: DatasetConfig, num_examples: int) -> list[dict[str, Any]]:
  """The first examples of a split, unbatched and unconverted (text plus token ids)."""
  task = task_for(config)
  dataset = task.get_dataset(dict(config.task_feature_lengths), split=config.split,
                             shuffle=False, num_epochs=1)
  return list(dataset.take(num_examples).as_numpy_iterator())


__all__ = ['DatasetConfig', 'get_dataset', 'task_for', 'global_batches', 'get_mixture_or_task',
           'pretokenized_examples', 'tasks']
