"""``python -m t5train.train``: train a model from gin files.

    python -m t5train.train --gin_file=gin/models/t5_1_1/tiny.gin \\
        --gin_file=gin/runs/pretrain.gin --gin_file=gin/tasks/demo.gin \\
        --gin.MODEL_DIR="'/tmp/smoke'" --gin.TRAIN_STEPS=20

Gin binds the arguments of ``train`` (see gin/runs/pretrain.gin). Running again
with the same MODEL_DIR resumes from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from t5train import (
  assembly,
  best_checkpoint,
  checkpoints,
  gin_utils,
  models,
  optimizers,
  partitioning,
  paths,
  preemption,
  profiling,
  summaries,
  trackers,
)
from t5train import trainer as trainer_lib
from t5train.errors import UserError
from t5train.t5x_compat import binaries as t5x_binaries

_GUARD = gin_utils.GinCallGuard()
DATASET_ITEM = 'dataset'  # the data iterator's item in a checkpoint


def _input_shapes(model: models.BaseTransformerModel, dataset_cfg: Any) -> dict[str, tuple]:
  return model.input_shapes(dataset_cfg.batch_size, dataset_cfg.task_feature_lengths)


RESTORE_DATASET_SETTING = '--gin.train_script.train.restore_dataset=False'


@dataclasses.dataclass(frozen=True)
class _DataStart:
  """How this host's training stream starts: ``config`` (with the stream's seed) skipping
  ``position.start_row`` rows, and whether the checkpoint's iterator is restored into it.
  ``position`` is None for a checkpoint saved without one (its iterator is restored as is)."""

  config: Any
  position: Any
  restore: bool


def _data_start(model: models.BaseTransformerModel, dataset_cfg: Any, random_seed: int,
                partitioner: partitioning.PjitPartitioner, manager: checkpoints.CheckpointManager,
                start_step: int, resumed: bool, restore_dataset: bool) -> _DataStart:
  """Where this host's training stream starts; decided before anything is compiled.

  A resume continues the checkpoint's stream at the row where it left off: its iterator is
  restored when the batch size is the same; with another batch size the stream is rebuilt
  with the checkpoint's seed, skips the rows already trained on and is batched anew. A
  stream of other settings (task, split, feature lengths, packing, seed) cannot continue:
  a UserError names what differs and the setting that starts the data afresh. Without a
  saved position (none was saved, ``restore_dataset=False``, or another number of hosts or
  data shards saved it), the stream starts afresh, seeded with the seed plus the step, so
  that it does not replay the batches already trained on.
  """
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  layout = partitioner.get_data_layout(dataset_cfg.batch_size)
  seed = dataset_cfg.seed if dataset_cfg.seed is not None else random_seed
  checkpoint = checkpoints.checkpoint_dir(manager.directory, start_step)
  item_dir = paths.join(checkpoint, DATASET_ITEM)

  def position(stream_seed: int, start_row: int = 0) -> Any:
    return data.DataPosition.of(dataset_cfg, model.FEATURE_CONVERTER_CLS, seed, stream_seed,
                                layout.shard_id, layout.num_shards, start_row)

  def afresh(reason: str | None) -> _DataStart:
    if reason is not None:
      logging.warning('%s: the data stream starts afresh (seed %d + step %d).', reason, seed,
                      start_step)
    return _DataStart(dataclasses.replace(dataset_cfg, seed=seed + start_step),
                      position(seed + start_step), False)

  if not start_step:
    return afresh(None)
  if not resumed:
    return afresh(f'Not continuing a data position at step {start_step} (the run starts from '
                  'another run\'s checkpoint)')
  if not restore_dataset:
    return afresh(f'Not continuing the data position of {checkpoint} (restore_dataset=False)')
  if not manager.save_config.save_dataset or not data.has_saved_iterator(item_dir):
    return afresh(f'Not continuing a saved data position ({checkpoint} has none for this host, '
                  'or save_dataset is off)')
  saved = data.saved_position(item_dir)
  if saved is None:  # saved before positions were recorded: restored as it is
    return _DataStart(dataclasses.replace(dataset_cfg, seed=seed), None, True)
  if (saved.shard_id, saved.num_shards) != (layout.shard_id, layout.num_shards):
    return afresh(f'Not continuing the data position of {checkpoint}: it holds data shard '
                  f'{saved.shard_id} of {saved.num_shards}, this host reads shard '
                  f'{layout.shard_id} of {layout.num_shards}')
  wanted = position(saved.stream_seed)
  differences = saved.stream_differences(wanted)
  if differences:
    raise UserError(f'the data cannot continue where {checkpoint} left off: its data stream '
                    f'had other settings ({"; ".join(differences)}); set '
                    f'{RESTORE_DATASET_SETTING} to start the data afresh')
  config = dataclasses.replace(dataset_cfg, seed=saved.stream_seed)
  if saved.host_batch_size == wanted.host_batch_size:
    return _DataStart(config, dataclasses.replace(wanted, start_row=saved.start_row,
                                                  rows=saved.rows), True)
  logging.info('BATCH_SIZE %d, not %d as in %s: the data continue at row %d of this host\'s '
               'stream (seed %d), %d rows a batch; reading the rows before it to skip them.',
               dataset_cfg.batch_size, saved.batch_size, checkpoint, saved.rows,
               saved.stream_seed, wanted.host_batch_size)
  return _DataStart(config, dataclasses.replace(wanted, start_row=saved.rows, rows=saved.rows),
                    False)


def _training_batches(model: models.BaseTransformerModel, start: _DataStart,
                      partitioner: partitioning.PjitPartitioner,
                      manager: checkpoints.CheckpointManager, start_step: int) -> Any:
  """This host's batches from ``start`` (see ``_data_start``); every checkpoint saves their
  iterator and position."""
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  layout = partitioner.get_data_layout(start.config.batch_size)
  dataset = data.get_dataset(start.config, model.FEATURE_CONVERTER_CLS, shard_id=layout.shard_id,
                             num_shards=layout.num_shards,
                             skip_rows=start.position.start_row if start.position else 0)
  batches = data.BatchIterator(dataset, partitioner.sharding(partitioner.data_partition_spec),
                               layout.batch_size, start.position)
  if start.restore:
    manager.restore_item(start_step, DATASET_ITEM, data.DatasetIteratorArgs(batches.iterator))
    batches.check_restored(checkpoints.checkpoint_dir(manager.directory, start_step),
                           RESTORE_DATASET_SETTING)
    logging.info('Data iterator restored: the data continue where checkpoint_%d left off.',
                 start_step)
  if manager.save_config.save_dataset:
    manager.add_item(DATASET_ITEM, data.DatasetIteratorArgs(batches.iterator, batches.position))
  return batches


def _evaluated_or_none(dataset_cfg: Any, kind: str) -> Any:
  """``dataset_cfg``, or None with a warning when its task has no such split (no VALIDATION_FILES)."""
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  if dataset_cfg is None:
    return None
  try:
    data.check_split(dataset_cfg)
  except UserError as e:
    logging.warning('No %s: %s.', kind, e)
    return None
  return dataset_cfg


def _finish_saves(manager: checkpoints.CheckpointManager) -> None:
  """Waits for the saves in flight; if another error is already on its way, only logs a failure."""
  propagating = sys.exc_info()[1] is not None
  try:
    manager.wait_until_finished()
  except Exception:  # pylint: disable=broad-except
    if not propagating:
      raise
    logging.exception('A checkpoint save failed as well.')


class _Evaluations:
  """``evaluate(step)`` for the loop: teacher-forced and inference metrics of the current params.

  The latest values are kept in ``results`` as ``<kind>/<task>/<metric>``.
  """

  def __init__(self, model: models.BaseTransformerModel,
               partitioner: partitioning.PjitPartitioner, param_shardings: Any,
               trainer: trainer_lib.Trainer, model_dir: str, train_eval_dataset_cfg: Any,
               eval_steps: int, infer_eval_dataset_cfg: Any, infer_eval_num_examples: int | None,
               keeper: best_checkpoint.BestCheckpointKeeper | None = None):
    from t5train import evaluation  # pylint: disable=g-import-not-at-top  (TensorFlow is slow)
    self._evaluation = evaluation
    self._trainer = trainer
    self.keeper = keeper
    self.results: dict[str, float] = {}
    self._evaluators: dict[str, Any] = {}
    if train_eval_dataset_cfg is not None and eval_steps > 0:
      self._evaluators['training_eval'] = evaluation.TeacherForcedEval(
          model, partitioner, param_shardings, train_eval_dataset_cfg, eval_steps,
          paths.join(model_dir, 'training_eval'))
    if infer_eval_dataset_cfg is not None:
      self._evaluators['inference_eval'] = evaluation.InferenceEval(
          model, partitioner, param_shardings, infer_eval_dataset_cfg, infer_eval_num_examples,
          log_dir=paths.join(model_dir, 'inference_eval'))

  def __bool__(self) -> bool:
    return bool(self._evaluators)

  def __call__(self, step: int) -> bool:
    """Evaluates at ``step``; returns whether to stop early."""
    for kind, evaluator in self._evaluators.items():
      metrics = evaluator(self._trainer.train_state.params, step)
      for line in self._evaluation.format_metrics(step, kind, metrics):
        logging.info(line)
      self.results.update({f'{kind}/{task}/{name}': value for task, values in metrics.items()
                           for name, value in values.items()})
    if self.keeper is None:
      return False
    return self.keeper.update(step, self.results, self._trainer.train_state)

  def close(self) -> None:
    for evaluator in self._evaluators.values():
      getattr(evaluator, 'close', lambda: None)()
    if self.keeper is not None:
      logging.info('Best checkpoint: %s.', self.keeper.describe())
      self.keeper.close()


def _check_best_metric(config: best_checkpoint.BestCheckpointConfig,
                       model: models.BaseTransformerModel, eval_period: int | None,
                       eval_steps: int, train_eval_dataset_cfg: Any,
                       infer_eval_dataset_cfg: Any) -> None:
  """A UserError, before anything is compiled, unless an evaluation will produce the metric."""
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  configs = {'training_eval': train_eval_dataset_cfg if eval_steps > 0 else None,
             'inference_eval': infer_eval_dataset_cfg}
  configs = {kind: cfg for kind, cfg in configs.items() if cfg is not None and eval_period}
  kind = config.metric.split('/')[0]
  tasks = data.subtask_names(configs[kind]) if kind in configs else []
  zeros = dict.fromkeys(('loss', 'z_loss', 'per_token_cross_ent_sum', 'num_correct',
                         'num_tokens', 'num_positions'), 0.0)
  config.check(configs, tasks, {'training_eval': model.metrics(zeros)})


def _num_parameters(state_shape: Any) -> int:
  """The number of model parameters in a train state's shapes (optimiser slots left out)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state_shape.params))


def train(*, model: models.BaseTransformerModel, train_dataset_cfg: Any,
          partitioner: partitioning.PjitPartitioner,
          checkpoint_cfg: checkpoints.SaveCheckpointConfig, model_dir: str, total_steps: int,
          restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig | None = None,
          learning_rate_fn: optimizers.LearningRateFn | None = None,
          num_microbatches: int | None = None, random_seed: int | None = 0,
          summary_period: int = 100, log_every_secs: float = 5.0, eval_period: int | None = None,
          eval_steps: int = 20, train_eval_dataset_cfg: Any = None,
          infer_eval_dataset_cfg: Any = None, infer_eval_num_examples: int | None = None,
          skip_nonfinite_steps: bool = False, finite_check_period: int = 10,
          stop_check_period: int = 10,
          best_checkpoint_cfg: best_checkpoint.BestCheckpointConfig | None = None,
          restore_dataset: bool = True, metric_writers: Sequence[str] | str = ('tensorboard',),
          profile_steps: Sequence[int] | None = None) -> dict[str, float]:
  """Trains ``model`` to ``total_steps`` in ``model_dir``; returns the last metrics.

  Every ``eval_period`` steps (and at the last) it evaluates: teacher-forced on
  ``eval_steps`` batches of ``train_eval_dataset_cfg``, and with the tasks' seqio
  metrics on ``infer_eval_dataset_cfg`` (the first ``infer_eval_num_examples``).
  SIGTERM or SIGINT stops after the current step with a checkpoint. A NaN or
  infinite step stops the run (TrainingError), or is skipped and counted with
  ``skip_nonfinite_steps``; the check reads the steps' flags every
  ``finite_check_period`` steps and before each save. With several processes, they agree on
  a stop every ``stop_check_period`` steps (one small all-gather). With ``best_checkpoint_cfg``
  the best checkpoint by an evaluation metric is kept in ``model_dir/best`` and training stops
  early when the metric stops improving (see ``best_checkpoint``). A resume continues the
  data where the checkpoint left off, with this run's batch size; ``restore_dataset=False``
  starts the data afresh instead (T5X's name). ``metric_writers`` (METRIC_WRITERS) adds
  experiment trackers to TensorBoard (``'wandb'``, ``'mlflow'``; see ``trackers``), which
  continue their runs on a resume. ``profile_steps`` (PROFILE_STEPS, ``(first, last)``) traces
  those steps with ``jax.profiler`` into ``model_dir/plugins/profile``.
  """
  _GUARD.enter()
  # RANDOM_SEED = None (T5X's default): a fresh seed for every process, recorded in config.gin.
  random_seed = gin_utils.resolve_random_seed(random_seed, train)
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  if total_steps < 0:
    raise UserError(f'TRAIN_STEPS must be >= 0, got {total_steps}')
  trainer_lib.check_finite_check_period(finite_check_period)
  chosen_trackers = trackers.check_metric_writers(metric_writers)
  profile_range = profiling.parse_range(profile_steps, 'PROFILE_STEPS')
  # Fail fast on a bad name or a task the model cannot read, before any compilation.
  data.check_features(train_dataset_cfg, model.FEATURE_CONVERTER_CLS)
  data.check_vocabularies(model, train_dataset_cfg)
  partitioner.validate()
  partitioner.get_data_layout(train_dataset_cfg.batch_size)  # a UserError if it does not split
  if num_microbatches and train_dataset_cfg.batch_size % num_microbatches:
    raise UserError(f'BATCH_SIZE {train_dataset_cfg.batch_size} is not divisible by '
                    f'num_microbatches={num_microbatches}')
  train_eval_dataset_cfg = _evaluated_or_none(train_eval_dataset_cfg, 'teacher-forced evaluation')
  infer_eval_dataset_cfg = _evaluated_or_none(infer_eval_dataset_cfg, 'inference evaluation')
  if getattr(getattr(model.module, 'config', None), 'num_prompts', 0) and train_dataset_cfg.pack:
    raise UserError('prompt tuning (num_prompts > 0) puts the prompts before each input, so the '
                    'examples cannot be packed; set train/data.DatasetConfig.pack = False '
                    '(finetune.gin does)')
  if best_checkpoint_cfg is not None:
    _check_best_metric(best_checkpoint_cfg, model, eval_period, eval_steps,
                       train_eval_dataset_cfg, infer_eval_dataset_cfg)
  # From here on a stop signal is a request: during set-up too (restoring, compiling).
  with (preemption.StopRequest(sync_period=stop_check_period) as stop_request,
        contextlib.ExitStack() as stack):
    directory = paths.resolve(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = os.fspath(directory)
    # Before the trainer's and evaluations' summary writers exist, which forward to them.
    stack.enter_context(trackers.open_trackers(
        chosen_trackers, trackers.RunIdentity.of(model_dir, 'train'), model_dir))

    parts = assembly.assemble_training(
        model, partitioner, _input_shapes(model, train_dataset_cfg), model_dir=model_dir,
        save_cfg=checkpoint_cfg, restore_cfg=restore_checkpoint_cfg, random_seed=random_seed,
        learning_rate_fn=learning_rate_fn, num_microbatches=num_microbatches,
        skip_nonfinite=skip_nonfinite_steps)
    trainer, manager, start_step = parts.trainer, parts.checkpoint_manager, parts.start_step
    data_start = (_data_start(model, train_dataset_cfg, random_seed, partitioner, manager,
                              start_step, parts.resumed, restore_dataset)
                  if start_step < total_steps else None)
    summary: dict[str, float] = {}
    evaluations = None
    if eval_period and start_step < total_steps:
      keeper = (best_checkpoint.BestCheckpointKeeper(
          best_checkpoint_cfg, model_dir, parts.initializer.train_state_shardings,
          parts.initializer.global_train_state_shape, manager.frozen_reference)
                if best_checkpoint_cfg else None)
      evaluations = _Evaluations(model, partitioner, parts.initializer.train_state_shardings.params,
                                 trainer, model_dir, train_eval_dataset_cfg, eval_steps,
                                 infer_eval_dataset_cfg, infer_eval_num_examples, keeper)
    # The bindings the run actually used (every configurable has been called by now), in
    # config.gin and as TensorBoard text in MODEL_DIR/train, as T5X's train writes them.
    summaries.summarize_gin_config(model_dir, trainer.summary_writer, start_step)
    trainer.summary_writer.write_hparams(
        {'model/num_parameters': _num_parameters(parts.initializer.global_train_state_shape)})
    profiler = (profiling.RangeProfiler(*profile_range, model_dir) if profile_range else None)
    if start_step >= total_steps:
      logging.info('Step %d already reaches TRAIN_STEPS=%d; nothing to train.', start_step,
                   total_steps)
      trainer.close()
    elif stop_request.requested():
      logging.warning('Stopped by %s before step %d: nothing new to save; rerun the same command '
                      'to start.', stop_request.signal_name or 'a signal on another process',
                      start_step + 1)
      trainer.close()
    else:
      batches = _training_batches(model, data_start, partitioner, manager, start_step)
      logging.info('Training steps %d to %d.', start_step + 1, total_steps)
      try:
        result = trainer_lib.run_training(
            trainer, batches, start_step, total_steps, manager, summary_period, log_every_secs,
            batch_shapes=_input_shapes(model, train_dataset_cfg),
            evaluate=evaluations or None, eval_period=eval_period, stop_request=stop_request,
            finite_check_period=finite_check_period, data_scalars_fn=data.data_scalars,
            step_hooks=(profiler,) if profiler else ())
        summary = result.summary
      finally:  # on an error too: let the checkpoints already started finish
        if profiler is not None:
          profiler.close()
        _finish_saves(manager)
        trainer.close()
        if evaluations is not None:
          evaluations.close()
    manager.close()
    if evaluations is not None:
      summary.update(evaluations.results)
    return summary


# T5X's arguments too (T5X's run files bind them): see t5x_compat.binaries.
train = t5x_binaries.accepts_t5x_arguments(train)

console_main = gin_utils.configured_binary(train, _GUARD, 't5train.train',
                                           on_start=preemption.catch_early_signals)


if __name__ == '__main__':
  # Gin files bind ``t5train.train.train``; run the importable copy of this module so that
  # the bindings and the function called are the same object.
  from t5train import train as _train_module  # pylint: disable=g-import-not-at-top
  _train_module.console_main()
