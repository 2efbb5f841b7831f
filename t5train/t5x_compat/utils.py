"""``t5x.utils``: data, checkpoint and schedule configuration, as t5train's objects.

``DatasetConfig``, ``SaveCheckpointConfig`` and ``RestoreCheckpointConfig`` take T5X's
arguments and return t5train's ``data.DatasetConfig`` and ``checkpoints.*CheckpointConfig``;
``CheckpointConfig`` holds both, as T5X's ``train`` takes them. The other names are t5train's
(``t5train.utils``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from t5train import checkpoints as _checkpoints
from t5train.errors import UserError
from t5train.optimizers import create_learning_rate_scheduler
from t5train.t5x_compat._args import dtype_name, require
from t5train.utils import (  # noqa: F401  (T5X's names, re-exported)
  LegacyCheckpointManager,
  TrainState,
  TrainStateInitializer,
  get_fallback_state,
  get_local_data,
  log_model_info,
  set_hardware_rng_ops,
)


def DatasetConfig(  # pylint: disable=invalid-name  (T5X's class name)
    mixture_or_task_name: Any, task_feature_lengths: Mapping[str, int] | None, split: str,
    batch_size: int, shuffle: bool, seed: int | None, use_cached: bool = False,
    pack: bool = False, use_custom_packing_ops: bool = False, module: str | None = None,
    use_memory_cache: bool = True, trim_output_features: bool = True,
    runtime_preprocessors: Sequence[Any] | None = None, num_prefetch_threads: int | None = None,
    num_workers: int | None = 0) -> Any:
  """T5X's ``DatasetConfig``: t5train's ``data.DatasetConfig`` with the same data settings.

  ``use_custom_packing_ops`` (tensor2tensor's packing ops, a speed option: seqio's packing
  gives the same examples) and ``use_memory_cache`` (caching evaluation data in memory) change
  nothing here. ``trim_output_features=False`` and AirIO's settings are refused.
  """
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  del use_custom_packing_ops, use_memory_cache  # accepted: no effect on the examples
  require('DatasetConfig.trim_output_features', trim_output_features, True,
          'features are always trimmed to TASK_FEATURE_LENGTHS')
  require('DatasetConfig.runtime_preprocessors', runtime_preprocessors, None,
          'AirIO tasks are not supported; register a seqio task')
  require('DatasetConfig.num_prefetch_threads', num_prefetch_threads, [None, 0],
          'AirIO tasks are not supported')
  require('DatasetConfig.num_workers', num_workers, [None, 0], 'AirIO tasks are not supported')
  name = getattr(mixture_or_task_name, 'name', mixture_or_task_name)  # a seqio Task or Mixture
  return data.DatasetConfig(mixture_or_task_name=name, task_feature_lengths=task_feature_lengths,
                            split=split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                            use_cached=use_cached, pack=pack, module=module)


class Checkpointer:
  """T5X's default ``checkpointer_cls``; t5train writes and reads checkpoints with Orbax."""


class OrbaxCheckpointManagerInterface:
  """T5X's default ``checkpoint_manager_cls``; t5train's is ``checkpoints.CheckpointManager``."""


def SaveCheckpointConfig(  # pylint: disable=invalid-name  (T5X's class name)
    dtype: str | None = 'float32', period: int | None = None,
    checkpoint_steps: Sequence[int] | None = None, keep: int | None = None,
    keep_dataset_checkpoints: int | None = None, save_dataset: bool = False,
    checkpointer_cls: Any = Checkpointer, state_transformation_fns: Sequence[Any] = (),
    checkpoint_manager_cls: Any = OrbaxCheckpointManagerInterface) -> Any:
  """T5X's ``SaveCheckpointConfig`` (T5X's defaults: no dataset in checkpoints) as t5train's.

  ``dtype=None`` (save as trained) saves float32, the dtype t5train trains parameters in.
  ``keep_dataset_checkpoints``: a checkpoint's data iterator is kept as long as the checkpoint
  (``keep``), so it is accepted and needs at most the disk space of the iterators it would
  have deleted.
  """
  require('SaveCheckpointConfig.checkpointer_cls', checkpointer_cls, Checkpointer,
          't5train writes Orbax checkpoints with its own checkpointer')
  require('SaveCheckpointConfig.checkpoint_manager_cls', checkpoint_manager_cls,
          OrbaxCheckpointManagerInterface, 't5train has one checkpoint manager')
  if keep_dataset_checkpoints is not None and save_dataset:
    logging.info('SaveCheckpointConfig.keep_dataset_checkpoints = %d: t5train keeps each '
                 "checkpoint's data iterator for as long as the checkpoint (keep = %s).",
                 keep_dataset_checkpoints, keep)
  return _checkpoints.SaveCheckpointConfig(
      period=period, keep=keep, steps=tuple(checkpoint_steps or ()),
      dtype=dtype_name(dtype) or 'float32', save_dataset=save_dataset,
      state_transformation_fns=tuple(state_transformation_fns))


# T5X's RestoreCheckpointConfig arguments and their defaults; t5train's dataclass takes those it
# has a field for, and the others must stay at these values.
_RESTORE_DEFAULTS: dict[str, Any] = {
    'mode': 'latest', 'assignment_map': None, 'strict': True, 'fallback_to_scratch': False,
    'dtype': None, 'restore_dataset': False, 'checkpointer_cls': Checkpointer,
    'state_transformation_fns': (), 'checkpoint_manager_cls': OrbaxCheckpointManagerInterface}
_RESTORE_REASONS = {
    'strict': 'the optimizer state is restored whenever the checkpoint has one',
    'restore_dataset': "a run started from another run's checkpoint starts its data afresh",
    'checkpointer_cls': 't5train reads checkpoints with its own reader',
    'checkpoint_manager_cls': 't5train has one checkpoint manager',
    'state_transformation_fns': 'use assignment_map to rename or drop parameters',
}


def RestoreCheckpointConfig(  # pylint: disable=invalid-name  (T5X's class name)
    path: str | Sequence[str] | None, mode: str = 'latest',
    assignment_map: Sequence[tuple[str, str | None]] | None = None, strict: bool = True,
    fallback_to_scratch: bool = False, dtype: str | None = None, restore_dataset: bool = False,
    checkpointer_cls: Any = Checkpointer, state_transformation_fns: Sequence[Any] = (),
    checkpoint_manager_cls: Any = OrbaxCheckpointManagerInterface) -> Any:
  """T5X's ``RestoreCheckpointConfig`` as t5train's.

  ``path`` may be a list, as in T5X: ``[]`` restores nothing (``path=None``), one path is that
  path. Several paths are refused (T5X's training refuses them too). The other arguments go to
  t5train's fields of the same name where it has them; otherwise they must keep T5X's default.
  """
  if path is not None and not isinstance(path, str):
    paths = list(path)
    if len(paths) > 1:
      raise UserError(f'RestoreCheckpointConfig.path = {paths}: t5train restores one path; '
                      "for every checkpoint of a directory use mode = 'all' on it")
    path = paths[0] if paths else None
  given = {'mode': mode, 'assignment_map': assignment_map, 'strict': strict,
           'fallback_to_scratch': fallback_to_scratch, 'dtype': dtype_name(dtype),
           'restore_dataset': restore_dataset, 'checkpointer_cls': checkpointer_cls,
           'state_transformation_fns': tuple(state_transformation_fns),
           'checkpoint_manager_cls': checkpoint_manager_cls}
  fields = {field.name for field in dataclasses.fields(_checkpoints.RestoreCheckpointConfig)}
  kwargs: dict[str, Any] = {'path': path}
  for name, value in given.items():
    if name in fields:
      if name == 'assignment_map':
        value = tuple(tuple(pair) for pair in value or ())
      if value is None and name == 'dtype':
        continue  # restored in the model's dtype
      kwargs[name] = value
    elif name != 'dtype':
      require(f'RestoreCheckpointConfig.{name}', value, _RESTORE_DEFAULTS[name],
              _RESTORE_REASONS.get(name, 'no such setting in t5train'))
  return _checkpoints.RestoreCheckpointConfig(**kwargs)


@dataclasses.dataclass
class CheckpointConfig:
  """T5X's pair of checkpoint configurations, as its ``train(checkpoint_cfg=...)`` takes it."""

  save: Any = None
  restore: Any = None


def get_dataset(cfg: Any, shard_id: int, num_shards: int, feature_converter_cls: Any,
                num_epochs: int | None = None, continue_from_checkpoint: bool = False) -> Any:
  """T5X's ``get_dataset``: this host's batched, feature-converted dataset of ``cfg``."""
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  del continue_from_checkpoint  # the train binary restores iterators itself
  return data.get_dataset(cfg, feature_converter_cls, num_epochs=num_epochs, shard_id=shard_id,
                          num_shards=num_shards)


def get_training_eval_datasets(cfg: Any, shard_id: int, num_shards: int, eval_steps: int,
                               feature_converter_cls: Any, deterministic: bool = False,
                               model_dir: str | None = None, start_step: int = 0) -> Any:
  """T5X's default ``train_eval_get_dataset_fn``: named as a default only; t5train's train
  builds its teacher-forced evaluation data itself."""
  raise UserError('utils.get_training_eval_datasets is not called by t5train: the train binary '
                  'reads train_eval_dataset_cfg itself')


def verify_matching_vocabs(cfg: Any, model: Any) -> None:
  """T5X's check that the task's vocabularies are the model's (a UserError if not); the
  binaries run it themselves before compiling."""
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  data.check_vocabularies(model, cfg)


__all__ = ['CheckpointConfig', 'Checkpointer', 'DatasetConfig', 'LegacyCheckpointManager',
           'OrbaxCheckpointManagerInterface', 'RestoreCheckpointConfig', 'SaveCheckpointConfig',
           'TrainState', 'TrainStateInitializer', 'create_learning_rate_scheduler',
           'get_dataset', 'get_fallback_state', 'get_local_data', 'get_training_eval_datasets',
           'log_model_info', 'set_hardware_rng_ops', 'verify_matching_vocabs']
