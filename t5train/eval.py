"""``python -m t5train.eval``: a task's seqio metrics for one checkpoint or every checkpoint of a run.

    python -m t5train.eval --gin_file=gin/models/t5_1_1/tiny.gin \\
        --gin_file=gin/runs/eval.gin --gin_file=gin/tasks/demo.gin \\
        --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.EVAL_OUTPUT_DIR="'/tmp/run/eval'"

seqio's Evaluator runs the task's metric functions on the model's predictions
and scores; its loggers write TensorBoard events (``EVAL_OUTPUT_DIR/<task>/``) and
``<task>-metrics.jsonl``. ``EVAL_OUTPUT_DIR/metrics.json`` maps each evaluated
step to its metrics; a rerun skips the steps already in it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import logging

from t5train import (
  checkpoint_reading,
  checkpoints,
  gin_utils,
  inference,
  models,
  multihost,
  partitioning,
  paths,
  trackers,
)
from t5train.t5x_compat import binaries as t5x_binaries

_GUARD = gin_utils.GinCallGuard()
RESULTS_FILE = 'metrics.json'
AllMetrics = dict[str, dict[str, dict[str, float]]]  # step -> task -> metric -> value


def _read_results(path: str) -> AllMetrics:
  path = paths.resolve(path)
  return json.loads(path.read_text()) if path.exists() else {}


def _write_results(path: str, results: AllMetrics) -> None:
  paths.write_text_atomically(path, json.dumps(results, indent=2, sort_keys=True))


def evaluate(*, model: models.BaseTransformerModel, partitioner: partitioning.PjitPartitioner,
             restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig, output_dir: str,
             dataset_cfg: Any, num_examples: int | None = None,
             decoder_params: dict[str, Any] | None = None,
             random_seed: int | None = 0,
             metric_writers: Sequence[str] | str = ('tensorboard',)) -> AllMetrics:
  """Evaluates the selected checkpoints in step order; returns every step's metrics so far.

  ``dataset_cfg.task_feature_lengths = None`` (T5X's eval.gin): the longest of each feature
  in the evaluated examples, as T5X's evaluation measures them. ``metric_writers``
  (METRIC_WRITERS) adds experiment trackers (``'wandb'``, ``'mlflow'``): the job is the run
  ``<run name>-eval`` in the training run's group, its metrics and predictions tagged
  ``eval/<task>/...``, its tracker run kept in ``output_dir/trackers.json``.
  """
  _GUARD.enter()
  random_seed = gin_utils.resolve_random_seed(random_seed, evaluate)
  from t5train import data, evaluation  # pylint: disable=g-import-not-at-top  (TensorFlow: slow)
  data.check_vocabularies(model, dataset_cfg, data.task_for(dataset_cfg))
  chosen_trackers = trackers.check_metric_writers(metric_writers)
  selected = checkpoints.select_checkpoints(restore_checkpoint_cfg)
  partitioner.validate()
  directory = paths.resolve(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  results_path = paths.join(directory, RESULTS_FILE)
  results = _read_results(results_path)
  todo = [(step, path) for step, path in selected if str(step) not in results]
  for step, _ in selected:
    if str(step) in results:
      logging.info('Step %d is already in %s; skipping it.', step, results_path)
  if not todo:
    return results

  lengths = data.max_feature_lengths(dataset_cfg, num_examples, evaluated_only=True)
  initializer = inference.params_initializer(model, partitioner, dataset_cfg.batch_size, lengths)
  run_dir = os.path.dirname(os.fspath(selected[-1][1]).rstrip('/'))  # the training run's
  identity = trackers.RunIdentity.of(run_dir, 'eval', directory=os.fspath(directory))
  with trackers.open_trackers(chosen_trackers, identity, os.fspath(directory), prefix='eval'):
    evaluator = evaluation.InferenceEval(
        model, partitioner, initializer.train_state_shardings.params, dataset_cfg, num_examples,
        log_dir=output_dir, decoder_params=decoder_params, seed=random_seed, lengths=lengths)
    try:
      for step, path in todo:
        metrics = evaluator(checkpoint_reading.restore_params(path, initializer,
                                                              restore_checkpoint_cfg.dtype), step)
        results[str(step)] = metrics
        if multihost.is_primary():
          _write_results(results_path, results)
        print('\n'.join(evaluation.format_metrics(step, 'eval', metrics)), flush=True)
    finally:
      evaluator.close()
  return results


# T5X's arguments too (T5X's run files bind them): see t5x_compat.binaries.
evaluate = t5x_binaries.accepts_t5x_arguments(evaluate)

console_main = gin_utils.configured_binary(evaluate, _GUARD, 't5train.eval')


if __name__ == '__main__':
  # Gin files bind ``t5train.eval.evaluate``; run the importable copy of this module.
  from t5train import eval as _eval_module  # pylint: disable=g-import-not-at-top
  _eval_module.console_main()
