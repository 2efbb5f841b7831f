"""Optimiser definitions and learning-rate schedules, built on optax.

An optimiser definition is a small frozen description (what gin binds); its
``make(learning_rate_fn)`` returns the optax transformation that does the work.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from t5train.errors import UserError

Array = jax.Array
LearningRateFn = Callable[[Array], Array]


class OptimizerDef(Protocol):
  def make(self, learning_rate_fn: LearningRateFn) -> optax.GradientTransformation:
    ...


@dataclasses.dataclass(frozen=True)
class Adafactor:
  """T5X's Adafactor defaults on ``optax.adafactor``.

  Factored second moments (for tensors with both of their two largest dims at
  least ``min_dim_size_to_factor``), decay ``1 - (step + step_offset)**-decay_rate``,
  updates scaled by the parameter's RMS (at least 1e-3, T5X's epsilon2) and clipped
  at RMS ``clipping_threshold``.
  """

  decay_rate: float = 0.8
  step_offset: int = 0
  multiply_by_parameter_scale: bool = True
  clipping_threshold: float | None = 1.0
  min_dim_size_to_factor: int = 128
  epsilon1: float = 1e-30
  beta1: float | None = None
  weight_decay_rate: float | None = None
  factored: bool = True

  def make(self, learning_rate_fn: LearningRateFn) -> optax.GradientTransformation:
    return optax.adafactor(
        learning_rate=learning_rate_fn, min_dim_size_to_factor=self.min_dim_size_to_factor,
        decay_rate=self.decay_rate, decay_offset=self.step_offset,
        multiply_by_parameter_scale=self.multiply_by_parameter_scale,
        clipping_threshold=self.clipping_threshold, momentum=self.beta1,
        weight_decay_rate=self.weight_decay_rate, eps=self.epsilon1, factored=self.factored)


@dataclasses.dataclass(frozen=True)
class AdamW:
  """AdamW with optional global-norm gradient clipping."""

  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float | None = None

  def make(self, learning_rate_fn: LearningRateFn) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_fn, b1=self.b1, b2=self.b2, eps=self.eps,
                        weight_decay=self.weight_decay)
    if self.max_grad_norm is None:
      return adamw
    return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)


FROZEN = 'frozen'


def param_path(path: tuple[str, ...]) -> str:
  """A parameter's name as the traversals match it: ``encoder/layers_0/attention/query/kernel``."""
  return '/'.join(str(part) for part in path)


@dataclasses.dataclass(frozen=True)
class MultiOptimizer:
  """Different optimisers for different parameters, and frozen ones (T5X's MultiOptimizer).

  Each parameter is updated by the optimiser of the first ``(regex, optimizer)`` pair whose regex
  matches its whole name (``param_path``), e.g. ``('decoder/.*', Adafactor())``. A parameter
  that no regex matches is frozen: it gets no optimiser state (``optax.set_to_zero``), no
  update, and no gradient is computed for it. Built on ``optax.multi_transform``.
  """

  traversals_and_optimizers: Sequence[tuple[str, OptimizerDef]]

  def __post_init__(self) -> None:
    for regex, _ in self.traversals_and_optimizers:
      try:
        re.compile(regex)
      except re.error as e:
        raise UserError(f'MultiOptimizer regex {regex!r} is not a regular expression: {e}') from e

  def label(self, name: str) -> str:
    """The index (as a string) of the pair that updates parameter ``name``, or ``FROZEN``."""
    for index, (regex, _) in enumerate(self.traversals_and_optimizers):
      if re.fullmatch(regex, name):
        return str(index)
    return FROZEN

  def trainable(self, name: str) -> bool:
    return self.label(name) != FROZEN

  def check(self, names: Iterable[str]) -> None:
    """A UserError naming the first regex that matches no parameter (a typo would otherwise
    freeze what it meant to train)."""
    names = list(names)
    for regex, _ in self.traversals_and_optimizers:
      if not any(re.fullmatch(regex, name) for name in names):
        raise UserError(f'MultiOptimizer regex {regex!r} matches no parameter; parameters are '
                         f'named like {names[0]!r} (see model-info.txt)')

  def _labels(self, params: Any) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: self.label(param_path(path)) for path in flat})

  def make(self, learning_rate_fn: LearningRateFn) -> optax.GradientTransformation:
    transforms = {str(index): optimizer.make(learning_rate_fn)
                  for index, (_, optimizer) in enumerate(self.traversals_and_optimizers)}
    transforms[FROZEN] = optax.set_to_zero()
    return optax.multi_transform(transforms, self._labels)


def trainable_fn(optimizer_def: OptimizerDef | None) -> Callable[[str], bool] | None:
  """Which parameters (by ``param_path``) ``optimizer_def`` updates; None: all of them."""
  return getattr(optimizer_def, 'trainable', None)


def check_parameter_names(optimizer_def: OptimizerDef | None, params: Any) -> None:
  """A UserError where ``optimizer_def`` names parameters that ``params`` does not have."""
  check = getattr(optimizer_def, 'check', None)
  if check is not None:
    check([param_path(path) for path in traverse_util.flatten_dict(params)])


_SCHEDULE_FACTORS = ('constant', 'linear_warmup', 'rsqrt_warmup', 'rsqrt_decay',
                     'rsqrt_normalized_decay', 'decay_every', 'linear_decay', 'cosine_decay')


def create_learning_rate_scheduler(
    factors: str = 'constant * linear_warmup * rsqrt_decay', base_learning_rate: float = 0.5,
    warmup_steps: int = 1000, decay_factor: float = 0.5, steps_per_decay: int = 20000,
    steps_per_cycle: int = 100000, step_offset: int = 0, min_learning_rate: float = 1e-8,
) -> LearningRateFn:
  """A learning rate that is the product of named factors (T5X's string syntax).

  For example ``'constant * linear_warmup * rsqrt_decay'`` with base 1.0 and 10k
  warmup steps is T5's pretraining schedule: linear ramp to 0.01, then 1/sqrt(step).
  ``linear_decay`` and ``cosine_decay`` run from ``warmup_steps`` over ``steps_per_cycle``.
  """
  names = [name.strip() for name in factors.split('*')]
  unknown = [name for name in names if name not in _SCHEDULE_FACTORS]
  if unknown:
    raise ValueError(f'unknown learning-rate factor(s) {unknown}; known: {_SCHEDULE_FACTORS}')

  def learning_rate_fn(step: Array) -> Array:
    step = jnp.asarray(step, jnp.float32) + step_offset
    rate = jnp.asarray(1.0, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / float(steps_per_cycle), 0.0, 1.0)
    for name in names:
      if name == 'constant':
        rate *= base_learning_rate
      elif name == 'linear_warmup':
        rate *= jnp.minimum(1.0, step / max(warmup_steps, 1))
      elif name == 'rsqrt_warmup':
        rate *= jnp.minimum(1.0, jnp.sqrt(step / max(warmup_steps, 1)))
      elif name == 'rsqrt_decay':
        rate /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == 'rsqrt_normalized_decay':
        rate *= jnp.sqrt(warmup_steps) / jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == 'decay_every':
        rate *= decay_factor ** jnp.floor(step / steps_per_decay)
      elif name == 'linear_decay':
        rate *= 1.0 - progress
      elif name == 'cosine_decay':
        rate *= 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.maximum(rate, min_learning_rate)

  return learning_rate_fn
