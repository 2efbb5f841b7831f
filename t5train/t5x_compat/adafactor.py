"""``t5x.adafactor``: T5X's Adafactor arguments on t5train's ``optimizers.Adafactor``."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import optax

from t5train import optimizers
from t5train.t5x_compat._args import dtype_name, require


class FactorDim(enum.Enum):
  """T5X's factoring roles of a parameter's logical axes."""
  NONE = None
  BATCH = enum.auto()
  ROW = enum.auto()
  COLUMN = enum.auto()


def standard_logical_factor_rules() -> dict[str, FactorDim]:
  """T5X's factoring rules by logical axis name. For T5's parameters they factor the same two
  dimensions as optax's rule (the two largest), which t5train's Adafactor uses."""
  return {
      'vocab': FactorDim.COLUMN, 'embed': FactorDim.ROW, 'mlp': FactorDim.COLUMN,
      'heads': FactorDim.COLUMN, 'kv': FactorDim.COLUMN, 'joined_kv': FactorDim.COLUMN,
      'relpos_buckets': FactorDim.NONE, 'layers': FactorDim.BATCH, 'stack': FactorDim.BATCH,
      'q_wi_fused': FactorDim.COLUMN, 'o_wo_fused': FactorDim.COLUMN,
      'multiquery_heads': FactorDim.COLUMN, 'kv_fused': FactorDim.COLUMN,
      'layer_norm_scale': FactorDim.NONE, 'mlp_activations': FactorDim.COLUMN,
  }


@dataclasses.dataclass(frozen=True)
class GlobalNormClipped:
  """An optimizer whose gradients are first clipped to a global norm (T5X's
  ``Adafactor(global_norm_clip_threshold=...)``)."""

  optimizer: Any
  max_norm: float

  def make(self, learning_rate_fn: optimizers.LearningRateFn) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(self.max_norm),
                       self.optimizer.make(learning_rate_fn))


class HParamMap:
  """T5X's per-parameter hyperparameter map, known by name so that ``Adafactor`` refuses it
  with its reason instead of gin failing to find it."""

  def __init__(self, rules: Any = ()) -> None:
    self.rules = rules

  def __repr__(self) -> str:
    return f'HParamMap({self.rules!r})'


def Adafactor(  # pylint: disable=invalid-name  (T5X's class name)
    learning_rate: float | None = None, factored: bool = True,
    multiply_by_parameter_scale: Any = True, beta1: float | None = None,
    decay_rate: float = 0.8, step_offset: int = 0, clipping_threshold: float | None = 1.0,
    weight_decay_rate: float | None = None, min_dim_size_to_factor: int = 128,
    epsilon1: float = 1e-30, epsilon2: float = 1e-3, dtype_momentum: Any = 'float32',
    factor_map: Any = None, logical_factor_rules: Mapping[str, Any] | None = None,
    weight_decay_rate_lr_exponent: float | None = None,
    global_norm_clip_threshold: float | None = None, max_parameter_scale: float | None = None,
    skip_nan_updates: bool | None = False) -> Any:
  """T5X's ``Adafactor`` as t5train's ``optimizers.Adafactor`` (optax's adafactor).

  ``learning_rate`` is accepted and unused, as in T5X's training, where the trainer's
  ``learning_rate_fn`` sets the rate. ``logical_factor_rules`` may be T5X's standard rules.
  ``global_norm_clip_threshold`` clips the gradients' global norm first (optax).
  """
  del learning_rate  # the trainer's learning_rate_fn gives the rate, as in T5X
  require('Adafactor.multiply_by_parameter_scale', multiply_by_parameter_scale, [True, False],
          'per-parameter maps (HParamMap) are not supported')
  require('Adafactor.epsilon2', epsilon2, 1e-3, "optax's adafactor fixes it at 1e-3")
  require('Adafactor.dtype_momentum', dtype_name(dtype_momentum), 'float32',
          'momentum is kept in float32')
  require('Adafactor.factor_map', factor_map, None,
          'factoring follows the two largest dimensions of each parameter')
  if logical_factor_rules is not None:
    require('Adafactor.logical_factor_rules', dict(logical_factor_rules),
            standard_logical_factor_rules(),
            'factoring follows the two largest dimensions of each parameter, as the standard '
            'rules do for T5')
  require('Adafactor.weight_decay_rate_lr_exponent', weight_decay_rate_lr_exponent, None,
          'weight decay is weight_decay_rate times the learning rate')
  require('Adafactor.max_parameter_scale', max_parameter_scale, None, 'not in optax')
  require('Adafactor.skip_nan_updates', skip_nan_updates, [False, None],
          'set train_script.train.skip_nonfinite_steps = True to skip whole non-finite steps')
  optimizer = optimizers.Adafactor(
      decay_rate=decay_rate, step_offset=step_offset,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, min_dim_size_to_factor=min_dim_size_to_factor,
      epsilon1=epsilon1, beta1=beta1, weight_decay_rate=weight_decay_rate, factored=factored)
  if global_norm_clip_threshold is not None:
    return GlobalNormClipped(optimizer, global_norm_clip_threshold)
  return optimizer


__all__ = ['Adafactor', 'FactorDim', 'GlobalNormClipped', 'HParamMap',
           'standard_logical_factor_rules']
