"""The one assembly of a training run, shared by the train binary, ``InteractiveModel``, the
benchmark and the tests.

From a model, a partitioner and the batch shapes it builds, in this order: the
train state's shapes and shardings (``TrainStateInitializer``), the model report,
the checkpoint manager, the state to start from (the directory's newest
checkpoint, else ``restore_cfg``'s, else fresh) and the ``Trainer`` that owns
it. Everything that holds arrays is created once, in its shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from t5train import (
  checkpoint_reading,
  checkpoints,
  model_info,
  models,
  optimizers,
  partitioning,
  paths,
)
from t5train import trainer as trainer_lib
from t5train.errors import UserError
from t5train.train_state import TrainState, TrainStateInitializer


@dataclasses.dataclass
class TrainingParts:
  """What ``assemble_training`` built. The trainer holds the only reference to the state, so
  that each step can update it in place."""

  model: models.BaseTransformerModel
  partitioner: partitioning.PjitPartitioner
  initializer: TrainStateInitializer
  checkpoint_manager: checkpoints.CheckpointManager | None
  trainer: trainer_lib.Trainer
  resumed: bool  # whether the state is the model directory's own newest checkpoint

  @property
  def train_state(self) -> TrainState:
    return self.trainer.train_state

  @property
  def start_step(self) -> int:
    """The step of the state the run started from."""
    return self._start_step

  def __post_init__(self) -> None:
    self._start_step = int(jax.device_get(self.trainer.train_state.step))

  def close(self) -> None:
    """Flushes the summaries and waits for the checkpoint saves in flight."""
    self.trainer.close()
    if self.checkpoint_manager is not None:
      self.checkpoint_manager.wait_until_finished()
      self.checkpoint_manager.close()


def _check_parameter_names(model: models.BaseTransformerModel, params: Any) -> None:
  """A UserError, before anything is compiled, where the optimiser or the LoRA targets name
  parameters the model does not have."""
  optimizers.check_parameter_names(model.optimizer_def, params)
  lora = getattr(getattr(model.module, 'config', None), 'lora', None)
  if lora is not None:
    names = [name for name, _ in checkpoint_reading.flatten_with_names(params)]
    try:
      lora.check_targets(names)
    except ValueError as e:
      raise UserError(str(e)) from None


def assemble_training(model: models.BaseTransformerModel,
                      partitioner: partitioning.PjitPartitioner,
                      input_shapes: Mapping[str, Any], *, model_dir: str | None = None,
                      save_cfg: checkpoints.SaveCheckpointConfig | None = None,
                      restore_cfg: checkpoints.RestoreCheckpointConfig | None = None,
                      random_seed: int = 0,
                      learning_rate_fn: optimizers.LearningRateFn | None = None,
                      num_microbatches: int | None = None, skip_nonfinite: bool = False,
                      input_types: Mapping[str, Any] | None = None) -> TrainingParts:
  """Builds the parts of a training run on batches of ``input_shapes``.

  With ``model_dir``, the run writes ``model-info.txt``, checkpoints (by
  ``save_cfg``) and TensorBoard summaries (``train/``) there and resumes from its
  newest checkpoint; without it, nothing is written. ``random_seed`` is split into
  the initialisation and dropout keys, as T5X does.
  """
  init_rng, trainer_rng = jax.random.split(jax.random.PRNGKey(random_seed))
  initializer = TrainStateInitializer(model.optimizer_def, model.get_initial_variables,
                                      input_shapes, input_types, partitioner)
  _check_parameter_names(model, initializer.global_train_state_shape.params)
  manager = None
  if model_dir is not None:
    model_info.log_model_info(paths.join(model_dir, 'model-info.txt'),
                              initializer.global_train_state_shape, partitioner,
                              initializer.train_state_logical_axes,
                              optimizers.trainable_fn(model.optimizer_def))
    manager = checkpoints.CheckpointManager(model_dir, save_cfg or checkpoints.SaveCheckpointConfig(),
                                            initializer.train_state_shardings,
                                            initializer.global_train_state_shape)
  state, resumed, restored_from = checkpoints.restore_or_initialize(manager, initializer,
                                                                   restore_cfg, init_rng)
  if manager is not None:
    checkpoints.frozen_reference_for(manager, optimizers.trainable_fn(model.optimizer_def),
                                     initializer.global_train_state_shape.params, resumed,
                                     restored_from)
  trainer = trainer_lib.Trainer(
      model, state, partitioner, initializer.train_state_axes, trainer_rng,
      learning_rate_fn or optimizers.create_learning_rate_scheduler(), num_microbatches,
      summary_dir=paths.join(model_dir, 'train') if model_dir is not None else None,
      skip_nonfinite=skip_nonfinite)
  del state  # the trainer's reference is the only one (see TrainingParts)
  return TrainingParts(model, partitioner, initializer, manager, trainer, resumed)
