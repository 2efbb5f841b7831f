"""The numeric settings of a run, checked right after gin parsing and before anything compiles.

A zero batch size or a negative feature length would otherwise surface minutes later as a
``ZeroDivisionError`` or a JAX shape error. Each rule names the macro (or binding) the user
sets, so the error says exactly what to change and which values are allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import gin
from t5train.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rule:
  """A numeric setting: integer or real, its bounds, and whether None is allowed."""
  kind: type  # int or float
  minimum: float | None = None
  maximum: float | None = None
  exclusive_minimum: bool = False
  exclusive_maximum: bool = False
  none_ok: bool = False

  def describe(self) -> str:
    words = ['an integer' if self.kind is int else 'a number']
    if self.minimum is not None:
      words.append(f'{">" if self.exclusive_minimum else ">="} {self.minimum:g}')
    if self.maximum is not None:
      words.append(f'{"and " if self.minimum is not None else ""}'
                   f'{"<" if self.exclusive_maximum else "<="} {self.maximum:g}')
    return ' '.join(words) + (' (or None)' if self.none_ok else '')

  def allows(self, value: Any) -> bool:
    if value is None:
      return self.none_ok
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.kind is int and not isinstance(value, int):
      return False
    if not math.isfinite(value):
      return False
    if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum
                                     else value < self.minimum):
      return False
    return self.maximum is None or (value < self.maximum if self.exclusive_maximum
                                    else value <= self.maximum)


_COUNT = Rule(int, 1)
_PROBABILITY = Rule(float, 0, 1, exclusive_maximum=True)

# Macros of gin/runs/, gin/tasks/ and the model gin files.
MACROS: dict[str, Rule] = {
    'TRAIN_STEPS': _COUNT,
    'BATCH_SIZE': _COUNT,
    'SUMMARY_PERIOD': _COUNT,
    'CHECKPOINT_PERIOD': Rule(int, 1, none_ok=True),
    'EVAL_PERIOD': Rule(int, 0, none_ok=True),  # 0 or None: no evaluation
    'EVAL_STEPS': _COUNT,
    'NUM_PARTITIONS': _COUNT,
    'RANDOM_SEED': Rule(int, 0, none_ok=True),  # None: a fresh seed, recorded in config.gin
    'INFER_EVAL_NUM_EXAMPLES': Rule(int, 1, none_ok=True),
    'DROPOUT_RATE': _PROBABILITY,
    'LABEL_SMOOTHING': _PROBABILITY,
    'Z_LOSS': Rule(float, 0),
    'NOISE_DENSITY': Rule(float, 0, 1, exclusive_minimum=True, exclusive_maximum=True),
    'MEAN_NOISE_SPAN_LENGTH': Rule(float, 1),
    'LORA_RANK': _COUNT,
    'LORA_ALPHA': Rule(float, 0, exclusive_minimum=True),
    'NUM_PROMPTS': Rule(int, 0),
}
# Settings the run gin files bind directly rather than through a macro (gin selectors).
BINDINGS: dict[str, Rule] = {
    'create_learning_rate_scheduler.base_learning_rate': Rule(float, 0, exclusive_minimum=True),
    'create_learning_rate_scheduler.warmup_steps': Rule(int, 0),
    'create_learning_rate_scheduler.decay_factor': Rule(float, 0),
    'train.num_microbatches': Rule(int, 1, none_ok=True),
    'train.finite_check_period': _COUNT,
    'train.stop_check_period': _COUNT,
    'PjitPartitioner.num_partitions': Rule(int, 1, none_ok=True),
    'SaveCheckpointConfig.keep': Rule(int, 1, none_ok=True),
    'SaveCheckpointConfig.keep_period': Rule(int, 1, none_ok=True),
    'BestCheckpointConfig.patience': Rule(int, 1, none_ok=True),
}
FEATURE_LENGTHS = 'TASK_FEATURE_LENGTHS'


def bound_value(name: str) -> tuple[bool, Any]:
  """(whether ``name`` is bound, its value); references to configurables count as unbound."""
  try:
    value = gin.query_parameter(name)
  except (ValueError, KeyError):
    return False, None
  if isinstance(value, gin.config.ConfigurableReference):  # @configurable() or %MACRO
    return False, None
  return True, value


def _show(value: Any) -> str:
  return f'{value!r} ({type(value).__name__})' if isinstance(value, (str, bool)) else repr(value)


def check_value(name: str, rule: Rule, value: Any) -> None:
  """UserError naming ``name`` unless ``value`` is allowed by ``rule``."""
  if not rule.allows(value):
    raise UserError(f'{name} must be {rule.describe()}, not {_show(value)}')


def check_feature_lengths(value: Any) -> None:
  """UserError unless ``value`` maps feature names to positive integer lengths."""
  if not isinstance(value, Mapping) or not value:
    raise UserError(f"{FEATURE_LENGTHS} must be a dict of feature lengths such as "
                    f"{{'inputs': 512, 'targets': 128}}, not {_show(value)}")
  for feature, length in value.items():
    check_value(f"{FEATURE_LENGTHS}['{feature}']", _COUNT, length)


def check_bound_settings() -> None:
  """Checks every numeric macro and binding the parsed gin config sets (see MACROS, BINDINGS)."""
  for name, rule in MACROS.items():
    bound, value = bound_value(f'%{name}')
    if bound:
      check_value(name, rule, value)
  bound, value = bound_value(f'%{FEATURE_LENGTHS}')
  if bound and value is not None:  # None: the longest in the data (eval and infer; T5X's)
    check_feature_lengths(value)
  for name, rule in BINDINGS.items():
    bound, value = bound_value(name)
    if bound:
      check_value(name, rule, value)
