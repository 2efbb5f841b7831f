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

from absl import flags, logging

import gin
from t5train import checkpoints, gin_utils, inference, models, multihost, partitioning
from t5train.errors import UserError

_GUARD = gin_utils.GinCallGuard()
RESULTS_FILE = 'metrics.json'
AllMetrics = dict[str, dict[str, dict[str, float]]]  # step -> task -> metric -> value


def _read_results(path: str) -> AllMetrics:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_results(path: str, results: AllMetrics) -> None:
  partial = f'{path}.tmp'
  with open(partial, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(partial, path)


def evaluate(*, model: models.EncoderDecoderModel, partitioner: partitioning.PjitPartitioner,
             restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig, output_dir: str,
             dataset_cfg: Any, num_examples: int | None = None,
             decoder_params: dict[str, Any] | None = None, random_seed: int = 0) -> AllMetrics:
  """Evaluates the selected checkpoints in step order; returns every step's metrics so far."""
  _GUARD.enter()
  from t5train import data, evaluation  # pylint: disable=g-import-not-at-top  (TensorFlow: slow)
  data.task_for(dataset_cfg)
  selected = checkpoints.select_checkpoints(restore_checkpoint_cfg)
  partitioner.validate()
  os.makedirs(output_dir, exist_ok=True)
  results_path = os.path.join(output_dir, RESULTS_FILE)
  results = _read_results(results_path)
  todo = [(step, path) for step, path in selected if str(step) not in results]
  for step, _ in selected:
    if str(step) in results:
      logging.info('Step %d is already in %s; skipping it.', step, results_path)
  if not todo:
    return results

  lengths = dict(dataset_cfg.task_feature_lengths)
  initializer = inference.params_initializer(model, partitioner, dataset_cfg.batch_size, lengths)
  evaluator = evaluation.InferenceEval(
      model, partitioner, initializer.train_state_shardings.params, dataset_cfg, num_examples,
      log_dir=output_dir, decoder_params=decoder_params, seed=random_seed)
  for step, path in todo:
    metrics = evaluator(checkpoints.restore_params(path, initializer), step)
    results[str(step)] = metrics
    if multihost.is_primary():
      _write_results(results_path, results)
    print('\n'.join(evaluation.format_metrics(step, 'eval', metrics)), flush=True)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  gin_utils.parse_gin_from_flags()
  gin_utils.call_configured(evaluate_from_gin, _GUARD)


def evaluate_from_gin() -> Any:
  """Calls ``evaluate`` with the arguments gin binds to it."""
  return gin.get_configurable(evaluate)()


def console_main() -> None:
  flags.adopt_module_key_flags(gin_utils)
  gin_utils.run(main, program='t5train.eval')


if __name__ == '__main__':
  # Gin files bind ``t5train.eval.evaluate``; run the importable copy of this module.
  from t5train import eval as _eval_module  # pylint: disable=g-import-not-at-top
  _eval_module.console_main()
