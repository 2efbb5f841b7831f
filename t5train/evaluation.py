"""Evaluation of a model's parameters: teacher-forced metrics and seqio inference metrics.

``TeacherForcedEval`` computes the training metrics (loss, accuracy) on fixed
batches of each task's validation split (T5X's ``training_eval``).
``InferenceEval`` runs the tasks' seqio metric functions on the model's
predictions and scores through ``seqio.Evaluator``, whose loggers write
TensorBoard events and JSON Lines. Training calls both every ``eval_period``
steps; the eval binary calls ``InferenceEval`` once per checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec

from t5train import data, inference, models, multihost, paths, prediction_summaries
from t5train import metrics as metrics_lib
from t5train.errors import UserError
from t5train.metrics import SummaryWriter
from t5train.partitioning import PjitPartitioner

TaskMetrics = dict[str, dict[str, float]]  # task -> metric -> value


def _for_task(config: data.DatasetConfig, task: str) -> data.DatasetConfig:
  return dataclasses.replace(config, mixture_or_task_name=task, module=None)


class TeacherForcedEval:
  """Loss and accuracy on ``num_batches`` fixed batches of each task in ``dataset_cfg``.

  The batches are read once and kept, so every evaluation sees the same
  examples. Summaries go to ``summary_root/<task>/``. A task without the split
  is skipped with a warning.
  """

  def __init__(self, model: models.BaseTransformerModel, partitioner: PjitPartitioner,
               param_shardings: Any, dataset_cfg: data.DatasetConfig, num_batches: int,
               summary_root: str | None):
    self._batches: dict[str, list[dict[str, jax.Array]]] = {}
    self._writers: dict[str, SummaryWriter] = {}
    layout = partitioner.get_data_layout(dataset_cfg.batch_size)
    batch_sharding = partitioner.sharding(partitioner.data_partition_spec)
    for task in data.subtask_names(dataset_cfg):
      config = _for_task(dataset_cfg, task)
      if config.split not in data.task_for(config).splits:
        logging.warning('Task %s has no %r split; it is left out of training_eval.', task,
                        config.split)
        continue
      dataset = data.get_dataset(config, model.FEATURE_CONVERTER_CLS, num_epochs=None,
                                 shard_id=layout.shard_id, num_shards=layout.num_shards)
      stream = data.BatchIterator(dataset.take(num_batches), batch_sharding, layout.batch_size)
      self._batches[task] = list(stream)
      self._writers[task] = SummaryWriter(
          paths.join(summary_root, task) if summary_root else None)

    def eval_step(params: Any, batch: Mapping[str, jax.Array]) -> models.Metrics:
      return model.metrics(model.loss_fn(params, batch, None)[1])

    self._eval_step = partitioner.partition(
        eval_step, in_shardings=(param_shardings, batch_sharding),
        out_shardings=partitioner.sharding(PartitionSpec()))

  def __call__(self, params: Any, step: int) -> TaskMetrics:
    results = {}
    for task, batches in self._batches.items():
      start = time.perf_counter()
      per_batch = jax.device_get([self._eval_step(params, batch) for batch in batches])
      seconds = time.perf_counter() - start
      merged = {name: functools.reduce(lambda a, b: a.merge(b), [m[name] for m in per_batch])
                for name in per_batch[0]}
      results[task] = {name: float(np.asarray(metric.compute())) for name, metric in merged.items()}
      # T5X's timing/* of the evaluation too, in TensorBoard only.
      _, seqs, targets = metrics_lib.batch_sizes({name: x.shape for name, x in batches[0].items()})
      timing = metrics_lib.timing_scalars(len(batches), seconds, seqs, targets)
      self._writers[task].write_scalars(step, results[task] | timing)
      self._writers[task].flush()
    return results

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def _metric_value(value: Any) -> float:
  """A metric value as a float (seqio gives clu ``Scalar``s or plain numbers)."""
  return float(np.asarray(getattr(value, 'value', value)))


class InferenceEval:
  """The seqio metrics of the tasks in ``dataset_cfg`` for given parameters.

  seqio's Evaluator reads and caches the split once; each call decodes and
  scores it with ``InferenceRunner``. With ``log_dir``, process 0 writes
  TensorBoard events (``log_dir/<task>/``: the metrics, and the first predictions as the
  text summary ``predictions``), ``<task>-metrics.jsonl`` and the predictions
  (``<task>-<step>.jsonl``) there, and sends the metrics and texts to the run's trackers.
  """

  def __init__(self, model: models.BaseTransformerModel, partitioner: PjitPartitioner,
               param_shardings: Any, dataset_cfg: data.DatasetConfig,
               num_examples: int | None = None, log_dir: str | None = None,
               decoder_params: Mapping[str, Any] | None = None, seed: int = 0,
               lengths: Mapping[str, int] | None = None):
    import seqio  # pylint: disable=g-import-not-at-top  (imported by data already)
    # TASK_FEATURE_LENGTHS = None: the longest in the data (``lengths``, when the caller has
    # measured them already), and seqio's Evaluator measures the same itself, as in T5X.
    measured = dataset_cfg.task_feature_lengths is None
    if measured:
      lengths = dict(lengths or data.max_feature_lengths(dataset_cfg, num_examples,
                                                         evaluated_only=True))
      logging.info('TASK_FEATURE_LENGTHS = None: the longest in %s (%s) are %s.',
                   dataset_cfg.mixture_or_task_name, dataset_cfg.split, lengths)
    else:
      lengths = dict(dataset_cfg.task_feature_lengths)
    self.lengths = lengths
    self._runner = inference.InferenceRunner(model, partitioner, param_shardings,
                                             dataset_cfg.batch_size, lengths['targets'],
                                             decoder_params, seed=seed)
    # Looked up when called, so that gin's binding of PredictionSummaryLogger takes effect.
    loggers = ((seqio.TensorBoardLogger, seqio.JSONLogger,
                prediction_summaries.PredictionSummaryLogger)
               if log_dir and multihost.is_primary() else ())
    data.task_for(dataset_cfg)  # imports the task module; a UserError for an unknown name
    self._evaluator = seqio.Evaluator(
        dataset_cfg.mixture_or_task_name, model.FEATURE_CONVERTER_CLS(pack=False),
        eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached, seed=seed,
        sequence_length=None if measured else lengths, num_examples=num_examples, shuffle=False,
        logger_cls=loggers, log_dir=log_dir)
    if not self._evaluator.eval_tasks:
      raise UserError(f'{dataset_cfg.mixture_or_task_name!r} has no task with metric functions '
                      f'and a {dataset_cfg.split!r} split; there is nothing to evaluate')

  def _model_fns(self, params: Any) -> dict[str, Any]:
    """seqio's predict, predict-with-aux and score functions over its (index, features) data."""
    def read(dataset: Any) -> tuple[list[int], list[Any]]:
      items = list(dataset.as_numpy_iterator())
      return [int(index) for index, _ in items], [features for _, features in items]

    def predict_with_aux_fn(dataset: Any) -> tuple[list[tuple[int, Any]], dict[str, list[float]]]:
      indices, features = read(dataset)
      tokens, scores = self._runner.predict(params, features)
      return list(zip(indices, tokens)), {'scores': scores}

    def score_fn(dataset: Any) -> list[tuple[int, float]]:
      indices, features = read(dataset)
      return list(zip(indices, self._runner.score(params, features)))

    return {'predict_fn': lambda dataset: predict_with_aux_fn(dataset)[0],
            'predict_with_aux_fn': predict_with_aux_fn, 'score_fn': score_fn}

  def __call__(self, params: Any, step: int) -> TaskMetrics:
    future, _ = self._evaluator.evaluate(compute_metrics=True, step=step,
                                         **self._model_fns(params))
    return {task: {name: _metric_value(value) for name, value in metrics.items()}
            for task, metrics in future.result().items()}

  def close(self) -> None:
    """Closes the loggers' summary writers."""
    for logger in self._evaluator.loggers:
      getattr(logger, 'close', lambda: None)()


def format_metrics(step: int, kind: str, results: TaskMetrics) -> list[str]:
  """One line per task: ``step 1000  inference_eval/sort_digits: exact_match 99.9, ...``."""
  return [f'step {step}  {kind}/{task}: ' +
          ', '.join(f'{name} {value:.4g}' for name, value in sorted(metrics.items()))
          for task, metrics in results.items()]
