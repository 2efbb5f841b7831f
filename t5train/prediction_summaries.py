"""The predictions behind a task's evaluation metrics, as a text summary one can read.

``PredictionSummaryLogger`` is a seqio logger (``seqio.Evaluator`` makes it with
``logger_cls(output_dir=...)`` and calls it after each evaluation of a task). For the first
``num_examples`` examples it writes a Markdown table (input, target, prediction, the model's
score where there is one, and each metric of the task computed on that example alone where the
metric can be) as the TensorBoard text summary ``predictions`` in ``output_dir/<task>/``, and it
sends the task's scalar metrics to the run's trackers (TensorBoard has them from seqio's own
logger, tagged ``eval/<metric>``). Bind ``PredictionSummaryLogger.num_examples`` in gin to show
more or fewer (``from t5train import prediction_summaries``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from t5train import paths
from t5train.metrics import SummaryWriter

TAG = 'predictions'
NUM_EXAMPLES = 8
_MAX_CHARS = 400  # of one table cell; the JSONL files keep the whole text


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray) and value.dtype.kind in 'SO' and value.ndim == 0:
    return _text(value.item())
  return str(value)


def _cell(value: Any) -> str:
  text = _text(value).replace('\\', '\\\\').replace('|', '\\|').replace('\n', ' ')
  return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 1] + '…'


def _number(value: Any) -> float | None:
  """A metric's value as a float, or None for values that are not one number."""
  value = getattr(value, 'value', value)
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    return None
  return float(array) if array.ndim == 0 else None


def _per_example_fns(task: Any) -> list[Callable[..., Mapping[str, Any]]]:
  """The task's metric functions of (targets, predictions) only: those that can score one
  example alone (not the ones that need scores or auxiliary values)."""
  fns = []
  for fn in getattr(task, 'predict_metric_fns', ()):
    try:
      parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
      continue
    if list(parameters)[:2] == ['targets', 'predictions'] and len(parameters) == 2:
      fns.append(fn)
  return fns


def example_scores(fns: Sequence[Callable[..., Mapping[str, Any]]], target: Any,
                   prediction: Any) -> dict[str, float]:
  """Each metric of ``fns`` on the one example; a metric that cannot be computed is left out."""
  scores = {}
  for fn in fns:
    try:
      values = fn([target], [prediction])
    except Exception:  # pylint: disable=broad-except  (a corpus metric need not take one example)
      continue
    for name, value in values.items():
      number = _number(value)
      if number is not None:
        scores[name] = number
  return scores


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of ``rows`` (dicts), with the columns of all rows in first-seen order."""
  columns: list[str] = []
  for row in rows:
    columns.extend(name for name in row if name not in columns)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(_format(row.get(name, '')) for name in columns) + ' |')
  return '\n'.join(lines)


def _format(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, float) else _cell(value)


def _input_text(example: Mapping[str, Any], task: Any) -> str:
  if 'inputs_pretokenized' in example:
    return _text(example['inputs_pretokenized'])
  feature = getattr(task, 'output_features', {}).get('inputs')
  if 'inputs' in example and feature is not None:
    return feature.vocabulary.decode([int(t) for t in np.asarray(example['inputs'])])
  return ''


def prediction_rows(task: Any, dataset: Any, inferences: Mapping[str, Sequence[Any]],
                    targets: Sequence[Any], num_examples: int) -> list[dict[str, Any]]:
  """One row per example for the first ``num_examples``: input, target, prediction, score, and
  each per-example metric."""
  fns = _per_example_fns(task)
  predictions = inferences.get('prediction') or inferences.get('output') or []
  scores = inferences.get('score') or []
  examples = list(dataset.take(num_examples).as_numpy_iterator()) if dataset is not None else []
  rows = []
  for index in range(min(num_examples, len(targets or []))):
    row: dict[str, Any] = {'input': _input_text(examples[index], task) if index < len(examples)
                           else '', 'target': targets[index]}
    if index < len(predictions):
      row['prediction'] = predictions[index]
      row.update(example_scores(fns, targets[index], predictions[index]))
    if index < len(scores) and _number(scores[index]) is not None:
      row['score'] = _number(scores[index])
    rows.append(row)
  return rows


class PredictionSummaryLogger:
  """seqio logger: the ``predictions`` text summary per task and step, and the task's scalar
  metrics for the trackers. Process 0 writes (its ``SummaryWriter``s do nothing elsewhere)."""

  def __init__(self, output_dir: str, num_examples: int = NUM_EXAMPLES):
    self._output_dir = output_dir
    self._num_examples = num_examples
    self._writers: dict[str, SummaryWriter] = {}

  def _writer(self, task_name: str) -> SummaryWriter:
    if task_name not in self._writers:
      self._writers[task_name] = SummaryWriter(paths.join(self._output_dir, task_name))
    return self._writers[task_name]

  def __call__(self, task_name: str, step: int | None, metrics: Mapping[str, Any],
               dataset: Any, inferences: Mapping[str, Sequence[Any]] | None,
               targets: Sequence[Any] | None) -> None:
    step = -1 if step is None else step  # as seqio's loggers do
    writer = self._writer(task_name)
    scalars = {name: _number(value) for name, value in metrics.items()}
    writer.write_tracker_scalars(step, {name: v for name, v in scalars.items() if v is not None})
    if inferences and targets and self._num_examples > 0:
      import seqio  # pylint: disable=g-import-not-at-top  (imported by the evaluator already)
      try:
        task = seqio.get_mixture_or_task(task_name)
      except ValueError:
        task = None
      rows = prediction_rows(task, dataset, inferences, targets, self._num_examples)
      if rows:
        writer.write_texts(step, {TAG: markdown_table(rows)})
      else:
        logging.info('No predictions of %s to summarise at step %d.', task_name, step)
    writer.flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()
