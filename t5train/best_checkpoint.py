"""The best checkpoint by a metric of evaluation during training, and early stopping.

Beside the periodic checkpoints, ``MODEL_DIR/best/`` holds the one checkpoint whose
metric is best so far, and ``MODEL_DIR/best/best.json`` says which step, metric and
value it is, and how many evaluations since have not improved on it (so a resumed run
goes on counting). ``MODEL_DIR/best`` is a model directory of one checkpoint:
``CHECKPOINT_PATH=MODEL_DIR/best`` gives it to infer and eval.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging
from etils import epath

from t5train import checkpoints, multihost, paths
from t5train.errors import UserError
from t5train.train_state import TrainState

BEST_DIR = 'best'
RECORD_FILE = 'best.json'
MODES = ('min', 'max')


@dataclasses.dataclass(frozen=True)
class BestCheckpointConfig:
  """Which metric picks the best checkpoint, and when to stop.

  ``metric`` is named as evaluation during training names it (and the end-of-run
  summary shows it): ``<kind>/<task>/<metric>``, e.g. ``'training_eval/sort_digits/loss'``
  or ``'inference_eval/sort_digits/exact_match'``. ``mode`` is ``'min'`` or ``'max'``.
  ``patience``: stop after this many evaluations in a row without improvement (None:
  never stop early).
  """

  metric: str
  mode: str = 'min'
  patience: int | None = None

  def __post_init__(self) -> None:
    if self.mode not in MODES:
      raise UserError(f"BestCheckpointConfig.mode must be 'min' or 'max', not {self.mode!r}")
    if self.patience is not None and self.patience < 1:
      raise UserError(f'BestCheckpointConfig.patience must be >= 1 or None, not {self.patience}')
    if self.metric.count('/') < 2:
      raise UserError(f"BestCheckpointConfig.metric {self.metric!r} must be "
                      "'<kind>/<task>/<metric>', e.g. 'training_eval/sort_digits/loss'")

  def check(self, kinds: Iterable[str], tasks: Iterable[str],
            known_metrics: Mapping[str, Iterable[str]]) -> None:
    """A UserError unless some evaluation will produce ``metric``, as far as is known before
    training: the kind is run, the task is evaluated, and the metric is one the kind makes
    (``known_metrics``: kind -> names, for kinds whose names are known in advance)."""
    kind, task, name = self.metric.split('/', 2)
    kinds, tasks = sorted(kinds), sorted(tasks)
    if kind not in kinds:
      raise UserError(f'BestCheckpointConfig.metric {self.metric!r}: no {kind} runs in this '
                      f'training (evaluations: {kinds or "none; set EVAL_PERIOD"})')
    if task not in tasks:
      raise UserError(f'BestCheckpointConfig.metric {self.metric!r}: task {task!r} is not '
                      f'evaluated (tasks: {tasks})')
    names = known_metrics.get(kind)
    if names is not None and name not in names:
      raise UserError(f'BestCheckpointConfig.metric {self.metric!r}: {kind} has no metric '
                      f'{name!r} (it has {sorted(names)})')

  def better(self, value: float, best: float | None) -> bool:
    if math.isnan(value):
      return False
    return best is None or (value < best if self.mode == 'min' else value > best)


class BestCheckpointKeeper:
  """Saves the train state to ``MODEL_DIR/best`` whenever the metric improves; says when the
  patience has run out."""

  def __init__(self, config: BestCheckpointConfig, model_dir: str, shardings: TrainState,
               shapes: TrainState,
               frozen_reference: checkpoints.FrozenReference | None = None):
    self.config = config
    self.directory = paths.join(model_dir, BEST_DIR)
    self._manager = checkpoints.CheckpointManager(
        self.directory, checkpoints.SaveCheckpointConfig(period=None, keep=1, save_dataset=False,
                                                         use_async=False),
        shardings, shapes)
    self._manager.frozen_reference = frozen_reference  # leave out what the run's checkpoints do
    self.record = self._read_record()

  def _record_path(self) -> epath.Path:
    return epath.Path(paths.join(self.directory, RECORD_FILE))

  def _read_record(self) -> dict[str, Any]:
    path = self._record_path()
    if not path.exists():
      return {}
    record = json.loads(path.read_text())
    if record.get('metric') != self.config.metric or record.get('mode') != self.config.mode:
      raise UserError(f'{path} keeps the best {record.get("mode")} {record.get("metric")!r}, '
                      f'and this run asks for the best {self.config.mode} '
                      f'{self.config.metric!r}; use another MODEL_DIR or move {self.directory}')
    return record

  def update(self, step: int, results: Mapping[str, float], state: TrainState) -> bool:
    """Records ``results`` of the evaluation at ``step``; returns whether to stop early."""
    config = self.config
    if config.metric not in results:
      raise UserError(f'BestCheckpointConfig.metric {config.metric!r} is not among the metrics '
                      f'of evaluation during training: {sorted(results)}')
    value = float(results[config.metric])
    if config.better(value, self.record.get('value')):
      if step not in self._manager.all_steps():
        self._manager.save(state, force=True)
        self._manager.wait_until_finished()
      self.record = {'metric': config.metric, 'mode': config.mode, 'value': value, 'step': step,
                     'checkpoint': checkpoints.checkpoint_dir(self.directory, step),
                     'evaluations_without_improvement': 0}
      logging.info('New best %s %.6g at step %d: %s', config.metric, value, step,
                   self.record['checkpoint'])
    else:
      self.record = {'metric': config.metric, 'mode': config.mode, 'value': None, 'step': None,
                     'checkpoint': None, 'evaluations_without_improvement': 0, **self.record}
      self.record['evaluations_without_improvement'] += 1
      logging.info('%s %.6g at step %d; %s (%d evaluation(s) without improvement)',
                   config.metric, value, step, self.describe(),
                   self.record['evaluations_without_improvement'])
    if multihost.is_primary():
      paths.write_text_atomically(str(self._record_path()),
                                  json.dumps(self.record, indent=2) + '\n')
    stop = (config.patience is not None and
            self.record['evaluations_without_improvement'] >= config.patience)
    if stop:
      logging.info('Early stopping: %d evaluations without a better %s; %s.', config.patience,
                   config.metric, self.describe())
    return stop

  def describe(self) -> str:
    """Where the best checkpoint is, in words."""
    if self.record.get('step') is None:
      return f'no best {self.config.metric} yet'
    return (f'the best {self.config.metric} is {self.record["value"]:.6g} at step '
            f'{self.record["step"]}: {self.record["checkpoint"]}')

  def close(self) -> None:
    self._manager.close()
