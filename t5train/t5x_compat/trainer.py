"""``t5x.trainer``: T5X's ``Trainer`` (constructor names and order) on t5train's trainer.

In T5X's run files ``train_script.train.trainer_cls = @trainer.Trainer`` carries the
trainer's ``learning_rate_fn`` and ``num_microbatches``; t5train's ``train`` reads them from
there (see ``t5x_compat.binaries``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from t5train import trainer as _trainer
from t5train.errors import UserError
from t5train.t5x_compat._args import require


class Trainer(_trainer.Trainer):
  """T5X's ``Trainer(model, train_state, partitioner, eval_names, summary_dir,
  train_state_axes, rng, learning_rate_fn, num_microbatches, weight_metrics_computer)``."""

  def __init__(self, model: Any, train_state: Any, partitioner: Any, eval_names: Sequence[str],
               summary_dir: str | None, train_state_axes: Any, rng: Any,
               learning_rate_fn: Any, num_microbatches: int | None,
               weight_metrics_computer: Any = None):
    require('Trainer.weight_metrics_computer', weight_metrics_computer, None,
            'weight metrics are not computed')
    super().__init__(model, train_state, partitioner, train_state_axes, rng, learning_rate_fn,
                     num_microbatches=num_microbatches or None, summary_dir=summary_dir,
                     eval_names=tuple(eval_names or ()))


class BaseAction:
  """T5X's base class of the actions ``train(actions={...})`` runs after a stage."""


class TerminateOnNanAction(BaseAction):
  """Stops training on a non-finite loss: what t5train's train loop always does (a
  ``TrainingError``, exit 1), unless ``skip_nonfinite_steps`` skips such steps instead."""

  def __init__(self, task: str, metric: str = 'loss'):
    self.task = task
    self.metric = metric


class EarlyStoppingAction(BaseAction):
  """Refused: t5train stops early through ``best_checkpoint.BestCheckpointConfig(patience=...)``."""

  def __init__(self, metric: tuple[str, str], mode: str, patience: int = 3,
               atol: float = 0.0, rtol: float = 0.0):
    del metric, mode, patience, atol, rtol
    raise UserError('trainer.EarlyStoppingAction is not supported by t5train; set '
                    'train_script.train.best_checkpoint_cfg = '
                    '@best_checkpoint.BestCheckpointConfig() with its metric and patience')


__all__ = ['BaseAction', 'EarlyStoppingAction', 'TerminateOnNanAction', 'Trainer']
